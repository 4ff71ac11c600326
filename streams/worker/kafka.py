"""Kafka client options built from the shared settings (kafka-python and aiokafka)."""

from __future__ import annotations

from contextlib import suppress

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


def aiokafka_options(settings: Settings) -> dict:
    """aiokafka's form of :func:`client_options` (TLS as an SSLContext)."""
    from aiokafka.helpers import create_ssl_context

    options = client_options(settings)
    files = {name: options.pop(f"ssl_{name}", None) for name in ("cafile", "certfile", "keyfile")}
    if options.get("security_protocol") in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(**files)
    return options


def refused(settings: Settings, exc: BaseException) -> UserError | None:
    """A failed connection that waiting cannot mend (TLS or SASL refused), as one line
    naming the settings to check; None when the broker may just be down or starting.

    The clients say little: kafka-python times out whatever went wrong, and aiokafka
    fails SCRAM with a KeyError. So a TLS handshake is tried here to get the reason,
    and a broker that accepts connections but not this client's SASL is named as such.
    """
    import socket
    import ssl

    host, _, port = settings.broker.removeprefix("kafka://").split(",")[0].rpartition(":")
    context = aiokafka_options(settings).get("ssl_context")  # the clients' own TLS settings
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            if context is not None:
                with context.wrap_socket(raw, server_hostname=host):
                    pass
    except ssl.SSLError as tls:
        why = f"certificate verify failed: {tls.verify_message}" \
            if isinstance(tls, ssl.SSLCertVerificationError) else tls.reason or tls
        return UserError(f"{settings.broker}: TLS refused: {why} (check "
                         "--tls-ca, --tls-cert and --tls-key)")
    except OSError:
        return None  # not listening: down or not started yet
    if settings.sasl_mechanism:
        return UserError(f"{settings.broker}: SASL {settings.sasl_mechanism} login as "
                         f"{settings.sasl_username!r} refused, or the broker does not take SASL "
                         f"({type(exc).__name__}; check --sasl-username, MODELWATCH_SASL_PASSWORD "
                         "and --sasl-mechanism)")
    return None


def cannot_connect(settings: Settings, exc: BaseException) -> UserError:
    """The one line for a client that could not connect."""
    return refused(settings, exc) or UserError(
        f"{settings.broker}: cannot connect: {type(exc).__name__}: {exc}")


async def start_consumer(consumer, settings: Settings) -> set[str]:
    """Start an aiokafka consumer and return the broker's topics; a refused connection
    is one clear line (the caller stops the consumer either way)."""
    from aiokafka.errors import KafkaError

    try:
        await consumer.start()
        return await consumer.topics()
    except (KafkaError, KeyError, OSError) as exc:  # aiokafka fails SCRAM with a KeyError
        raise cannot_connect(settings, exc) from None


def create_topics(settings: Settings, partitions: dict[str, int]) -> None:
    """Create each topic with its partition count, unless it exists (replication 1)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    try:
        admin = KafkaAdminClient(request_timeout_ms=10_000, **client_options(settings))
    except KafkaError as exc:
        raise cannot_connect(settings, exc) from None
    try:
        for topic, count in partitions.items():
            with suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(topic, num_partitions=count,
                                              replication_factor=1)])
    except KafkaError as exc:
        raise UserError(f"{settings.broker}: cannot create topic {topic}: {exc}") from None
    finally:
        admin.close()


def send_one(settings: Settings, topic: str, *, key: bytes, value: bytes,
             timeout_s: float = 30.0) -> str:
    """Send one record and wait for the broker's acknowledgement (acks=all)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        producer = KafkaProducer(acks="all", **client_options(settings))
    except KafkaError as exc:
        raise cannot_connect(settings, exc) from None
    try:
        sent = producer.send(topic, key=key, value=value).get(timeout=timeout_s)
    except KafkaError as exc:
        raise UserError(f"{settings.broker}: {topic}: not acknowledged: {exc}") from None
    finally:
        producer.close()
    return f"{topic}[{sent.partition}]@{sent.offset}"
