from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Federated training"

    def ready(self) -> None:
        from training.jobs import permissions, receivers  # noqa: F401 - registers rules and receivers

        receivers.connect()
