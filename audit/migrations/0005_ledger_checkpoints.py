"""The ledger's signed checkpoints and the sites' cosignatures of them (issue 16).

Ordinary tables: the checkpoints are evidence the sites keep their own copies of.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("audit", "0004_ledger_guard_without_session_switch"),
        ("consortium", "0001_initial"),
        ("training", "0002_engine_rounds_and_credentials"),
    ]

    operations = [
        migrations.CreateModel(
            name="LedgerCheckpoint",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("tree_size", models.PositiveBigIntegerField(unique=True)),
                ("root_hash", models.CharField(max_length=64)),
                ("note", models.TextField()),
                ("created_at", models.DateTimeField(auto_now_add=True)),
            ],
            options={
                "ordering": ["-tree_size"],
            },
        ),
        migrations.CreateModel(
            name="CheckpointWitness",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("key_name", models.CharField(max_length=100)),
                ("public_key", models.TextField()),
                ("signature_line", models.TextField()),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "credential",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="+",
                        to="training.sitecredential",
                    ),
                ),
                (
                    "institution",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="consortium.institution",
                    ),
                ),
                (
                    "checkpoint",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="witnesses",
                        to="audit.ledgercheckpoint",
                    ),
                ),
            ],
            options={
                "ordering": ["checkpoint", "created_at"],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("checkpoint", "institution"),
                        name="one_witness_per_site_and_checkpoint",
                    )
                ],
            },
        ),
    ]
