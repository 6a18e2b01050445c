"""docker-compose.yml parses, names every service, and points them at real URLs.
(No Docker engine runs here, so the stack itself is not started.)"""

import yaml

from pipeline import config

from .conftest import ROOT


def test_compose_names_every_service():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {
        "kafka",
        "clickhouse",
        "migrate",
        "ingress",
        "worker",
        "sink",
        "callbacks",
    }
    for name in ("migrate", "ingress", "worker", "sink", "callbacks"):
        command = services[name]["command"]
        assert command[0] == name and command[1:] == ["--config", "/etc/pipeline/pipeline.toml"]
        assert set(services[name]["depends_on"]) == {"kafka", "clickhouse"}
    assert "KRaft" in (ROOT / "docker-compose.yml").read_text()
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_production_config_uses_real_endpoints():
    settings = config.load(ROOT / "deploy" / "production.toml")
    assert settings.kafka_bootstrap == "kafka:9092"
    assert (
        settings.clickhouse_url.startswith("http://")
        and "clickhouse:8123" in settings.clickhouse_url
    )
    assert not settings.allow_private_networks
