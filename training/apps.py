from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Federated training"

    def ready(self) -> None:
        # In ready(): the rules and receivers import models (Django app-loading order).
        from training.jobs import permissions, receivers  # noqa: F401 - registers them

        receivers.connect()
