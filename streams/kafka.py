"""Kafka clients built from the shared settings (kafka-python: producer and admin)."""

from __future__ import annotations

from streams.settings import Settings
from streams.tabular import UserError


def client_options(settings: Settings) -> dict:
    """Connection options for kafka-python clients: servers, TLS, SASL."""
    servers = settings.broker.removeprefix("kafka://").split(",")
    options: dict = {"bootstrap_servers": servers}
    tls = settings.tls_ca or settings.tls_cert
    if tls:
        options.update(ssl_cafile=str(settings.tls_ca) if settings.tls_ca else None,
                       ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
                       ssl_keyfile=str(settings.tls_key) if settings.tls_key else None)
    if settings.sasl_mechanism:
        options.update(sasl_mechanism=settings.sasl_mechanism,
                       sasl_plain_username=settings.sasl_username,
                       sasl_plain_password=settings.sasl_password)
    if tls or settings.sasl_mechanism:
        options["security_protocol"] = ("SASL_SSL" if tls else "SASL_PLAINTEXT") \
            if settings.sasl_mechanism else "SSL"
    return options


def send_one(settings: Settings, topic: str, *, key: bytes, value: bytes,
             timeout_s: float = 30.0) -> str:
    """Send one record and wait for the broker's acknowledgement (acks=all)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        producer = KafkaProducer(acks="all", **client_options(settings))
    except KafkaError as exc:
        raise UserError(f"{settings.broker}: cannot connect: {exc}") from None
    try:
        sent = producer.send(topic, key=key, value=value).get(timeout=timeout_s)
    except KafkaError as exc:
        raise UserError(f"{settings.broker}: {topic}: not acknowledged: {exc}") from None
    finally:
        producer.close()
    return f"{topic}[{sent.partition}]@{sent.offset}"
