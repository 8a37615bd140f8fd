"""Kafka trusts no one by default: SASL/SCRAM users and ACLs (deploy/kafka_access.py), on the real broker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import GroupAuthorizationFailedError, KafkaConnectionError, TopicAuthorizationFailedError

from deploy import kafka_access
from kota.contract import DEADLETTER_TOPIC, READINGS_TOPIC, Reason, Rejection, encode_dead_letter
from kota.settings import StackSettings, read_secret

NOT_LOGGED_IN = KafkaConnectionError  # aiokafka's answer to a refused SASL login (or none on a SASL listener)


def as_user(stack: StackSettings, user: str, password: str | None = None) -> dict[str, Any]:
    return {
        **stack.kafka_client_options(),
        "sasl_plain_username": user,
        "sasl_plain_password": password or read_secret(stack.state_dir, kafka_access.password_file(user)),
    }


async def produce(options: dict[str, Any], topic: str, value: bytes, **extra: Any) -> None:
    producer = AIOKafkaProducer(**options, request_timeout_ms=5000, **extra)
    try:
        await asyncio.wait_for(producer.start(), 10)
        await asyncio.wait_for(producer.send_and_wait(topic, value, key=b"access-test"), 10)
    finally:
        await producer.stop()


async def consume(options: dict[str, Any], group_id: str | None, topic: str = READINGS_TOPIC) -> None:
    """Read `topic` once: as a member of `group_id`, or assigned partition 0 without a group."""
    consumer = AIOKafkaConsumer(
        **options, group_id=group_id, enable_auto_commit=False, request_timeout_ms=5000, auto_offset_reset="latest"
    )
    try:
        await asyncio.wait_for(consumer.start(), 10)
        if group_id is None:
            consumer.assign([TopicPartition(topic, 0)])
        else:
            consumer.subscribe([topic])
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:  # a group refusal comes at join, an ACL refusal at fetch
            await consumer.getmany(timeout_ms=500)
            if consumer.assignment():
                await asyncio.wait_for(consumer.position(next(iter(consumer.assignment()))), 5)
                return
        raise TimeoutError("no partition assigned")
    finally:
        await consumer.stop()


def dead_letter() -> bytes:
    rejection = Rejection(Reason.BAD_SHAPE, "tests/test_kafka_access.py: the gateway may write")
    return encode_dead_letter(
        topic="kota/test/access", payload=b"{}", received_ms=int(time.time() * 1000), rejections=[rejection]
    )


def test_clients_without_credentials_or_with_a_wrong_password_are_refused(stack):
    plaintext = {"bootstrap_servers": stack.kafka_bootstrap}
    with pytest.raises(NOT_LOGGED_IN):
        asyncio.run(consume(plaintext, None))
    with pytest.raises(NOT_LOGGED_IN):
        asyncio.run(consume(as_user(stack, kafka_access.API, "not-the-password"), None))
    with pytest.raises(NOT_LOGGED_IN):
        asyncio.run(produce(as_user(stack, kafka_access.GATEWAY, "not-the-password"), DEADLETTER_TOPIC, dead_letter()))


def test_only_the_gateway_produces(stack):
    asyncio.run(produce(as_user(stack, kafka_access.GATEWAY), DEADLETTER_TOPIC, dead_letter(), enable_idempotence=True))
    for user in (kafka_access.API, kafka_access.PROCESSOR):
        for topic in (READINGS_TOPIC, DEADLETTER_TOPIC):
            with pytest.raises(TopicAuthorizationFailedError):
                asyncio.run(produce(as_user(stack, user), topic, b"not from the gateway"))


def test_only_the_processor_group_and_the_api_consume(stack):
    asyncio.run(consume(as_user(stack, kafka_access.PROCESSOR), "kota-processor-access-test"))
    asyncio.run(consume(as_user(stack, kafka_access.API), None))
    asyncio.run(consume(as_user(stack, kafka_access.API), None, DEADLETTER_TOPIC))  # a device's rejections
    with pytest.raises(GroupAuthorizationFailedError):  # the processor's user, in a group not its own
        asyncio.run(consume(as_user(stack, kafka_access.PROCESSOR), "access-test"))
    with pytest.raises(GroupAuthorizationFailedError):  # the gateway reads nothing, in a group or not
        asyncio.run(consume(as_user(stack, kafka_access.GATEWAY), "kota-processor"))
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(consume(as_user(stack, kafka_access.GATEWAY), None))
    with pytest.raises(GroupAuthorizationFailedError):  # the API reads without a group only
        asyncio.run(consume(as_user(stack, kafka_access.API), "kota-processor-api"))


def test_the_dead_letter_topic_has_a_capped_disk_and_deploy_restores_the_cap(stack):
    """Devices set the dead-letter topic's volume: its disk is capped (a flood deletes the oldest)
    from its creation, and a topic created without the cap (an older deploy) gets it at start."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from deploy.kafka import create_topics, deadletter_topic_config, kafka_admin_options, topic_config

    wanted = deadletter_topic_config(stack)
    assert int(wanted["retention.bytes"]) == stack.kafka_deadletter_max_bytes > 0

    async def config() -> dict[str, str]:
        admin = AIOKafkaAdminClient(request_timeout_ms=10000, **kafka_admin_options(stack))
        await admin.start()
        try:
            return await topic_config(admin, DEADLETTER_TOPIC, list(wanted))
        finally:
            await admin.close()

    async def uncap() -> None:
        admin = AIOKafkaAdminClient(request_timeout_ms=10000, **kafka_admin_options(stack))
        await admin.start()
        try:
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, DEADLETTER_TOPIC, {})])
        finally:
            await admin.close()

    assert asyncio.run(config()) == wanted
    asyncio.run(uncap())  # as an older deploy left it: the broker's defaults, no cap
    assert asyncio.run(config())["retention.bytes"] == "-1"
    asyncio.run(create_topics(stack))
    assert asyncio.run(config()) == wanted
