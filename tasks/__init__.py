"""Pipeline stages. Each module holds plain, testable logic; `tasks.prefect_tasks` wraps them."""
