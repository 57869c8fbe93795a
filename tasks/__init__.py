"""Pipeline stages. Each module holds plain, testable logic; `tasks.stages` wraps them as Prefect tasks."""
