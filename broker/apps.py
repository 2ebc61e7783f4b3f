from django.apps import AppConfig


class BrokerConfig(AppConfig):
    name = "broker"
    verbose_name = "Regional registry"

    def ready(self) -> None:
        from broker.api import schema  # noqa: F401  (registers the OpenAPI extensions)
