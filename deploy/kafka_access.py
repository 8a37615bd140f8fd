"""Who may do what on Kafka: SCRAM users and ACLs, kept in step by deploy on every start.

Users (SASL/SCRAM-SHA-512), each with its password in the secrets folder (`kafka-<user>.password`):
    kota-admin      super user (super.users): deploy, the CLI, tests
    kota-gateway    writes kota.readings and kota.deadletter (idempotent producer)
    kota-processor  reads kota.readings in consumer groups whose id starts with kota-processor
    kota-api        reads kota.readings and kota.deadletter without a group (live feed, /health's
                    lag, a device's rejections)

aiokafka has no admin call for SCRAM credentials, and only ACL request versions Kafka 4 no longer
accepts (KIP-896), and the broker libraries deploy resolves hold no AclCommand: the two requests are
written here in the protocol's own (flexible) form and sent with aiokafka's client. Both are
idempotent: an upsert of a credential replaces it, and an ACL that exists already is left as it is.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, TypeAlias

from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import CompactArray, CompactBytes, CompactString, Int8, Int16, Int32, Schema, TaggedFields

from kota.contract import DEADLETTER_TOPIC, READINGS_TOPIC
from kota.settings import StackSettings, ensure_secret

ADMIN = "kota-admin"
GATEWAY = "kota-gateway"
PROCESSOR = "kota-processor"
API = "kota-api"
USERS = (ADMIN, GATEWAY, PROCESSOR, API)
PROCESSOR_GROUP_PREFIX = "kota-processor"  # ProcessorSettings.group_id and every group a bench or test gives it

SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_SHA_512 = 2  # the protocol's ScramMechanism code
SCRAM_ITERATIONS = 8192  # Kafka's minimum is 4096


def password_file(user: str) -> str:
    return f"kafka-{user}.password"


def ensure_passwords(stack: StackSettings) -> dict[str, str]:
    """Every Kafka user's password, made in the secrets folder at first start and kept after."""
    return {user: ensure_secret(stack.state_dir, password_file(user)) for user in USERS}


# The Kafka user each component runs as; anything else (the CLI, tests, benchmarks) is kota-admin.
COMPONENT_USERS = {"gateway": GATEWAY, "processor": PROCESSOR, "api": API}


# -- ACLs ----------------------------------------------------------------------------------------
# Codes from the Kafka protocol (org.apache.kafka.common.resource / acl).
TOPIC, GROUP, CLUSTER = 2, 3, 4
LITERAL, PREFIXED = 3, 4
READ, WRITE, DESCRIBE, IDEMPOTENT_WRITE = 3, 4, 8, 12
ALLOW = 3
CLUSTER_NAME = "kafka-cluster"


@dataclass(frozen=True)
class Acl:
    user: str
    resource_type: int
    resource_name: str
    operation: int
    pattern: int = LITERAL


ACLS = (
    # The gateway writes readings and dead letters with an idempotent producer.
    *(Acl(GATEWAY, TOPIC, topic, op) for topic in (READINGS_TOPIC, DEADLETTER_TOPIC) for op in (WRITE, DESCRIBE)),
    Acl(GATEWAY, CLUSTER, CLUSTER_NAME, IDEMPOTENT_WRITE),
    # The processor reads readings as a consumer group (and commits there, for lag tools).
    *(Acl(PROCESSOR, TOPIC, READINGS_TOPIC, op) for op in (READ, DESCRIBE)),
    *(Acl(PROCESSOR, GROUP, PROCESSOR_GROUP_PREFIX, op, PREFIXED) for op in (READ, DESCRIBE)),
    # The API reads without a group: readings for the live feed and /health's end offsets, dead
    # letters for a device's rejections (ops_api/rejections.py).
    *(Acl(API, TOPIC, topic, op) for topic in (READINGS_TOPIC, DEADLETTER_TOPIC) for op in (READ, DESCRIBE)),
)


# -- the two requests aiokafka lacks, in their flexible (KIP-482) versions ---------------------
class CreateAclsResponse_v2(Response):  # type: ignore[misc]  # aiokafka ships no types
    API_KEY = 30
    API_VERSION = 2
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(("error_code", Int16), ("error_message", CompactString("utf-8")), ("tags", TaggedFields)),
        ),
        ("tags", TaggedFields),
    )


class CreateAclsRequest_v2(RequestStruct):  # type: ignore[misc]  # aiokafka ships no types
    FLEXIBLE_VERSION = True
    API_KEY = 30
    API_VERSION = 2
    RESPONSE_TYPE = CreateAclsResponse_v2
    SCHEMA = Schema(
        (
            "creations",
            CompactArray(
                ("resource_type", Int8),
                ("resource_name", CompactString("utf-8")),
                ("resource_pattern_type", Int8),
                ("principal", CompactString("utf-8")),
                ("host", CompactString("utf-8")),
                ("operation", Int8),
                ("permission_type", Int8),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class CreateAclsResponse_v3(CreateAclsResponse_v2):
    API_VERSION = 3


class CreateAclsRequest_v3(CreateAclsRequest_v2):
    API_VERSION = 3
    RESPONSE_TYPE = CreateAclsResponse_v3


CreateAclsStruct: TypeAlias = CreateAclsRequest_v2 | CreateAclsRequest_v3


class CreateAcls(Request[CreateAclsStruct]):  # type: ignore[misc]  # aiokafka ships no types
    API_KEY = 30

    def __init__(self, acls: tuple[Acl, ...]) -> None:
        self._creations: list[tuple[object, ...]] = [
            (a.resource_type, a.resource_name, a.pattern, f"User:{a.user}", "*", a.operation, ALLOW, {}) for a in acls
        ]

    def build(self, request_struct_class: type[CreateAclsStruct]) -> CreateAclsStruct:
        return request_struct_class(self._creations, {})


class AlterUserScramCredentialsResponse_v0(Response):  # type: ignore[misc]  # aiokafka ships no types
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class AlterUserScramCredentialsRequest_v0(RequestStruct):  # type: ignore[misc]  # aiokafka ships no types
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = AlterUserScramCredentialsResponse_v0
    SCHEMA = Schema(
        ("deletions", CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields))),
        (
            "upsertions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class AlterUserScramCredentials(Request[AlterUserScramCredentialsRequest_v0]):  # type: ignore[misc]  # aiokafka ships no types
    API_KEY = 51

    def __init__(self, passwords: dict[str, str]) -> None:
        self._upsertions: list[tuple[object, ...]] = []
        for user, password in passwords.items():
            salt = os.urandom(32)
            # SCRAM's Hi(): the salted password is PBKDF2 of the password (RFC 5802); the broker derives its keys.
            salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, SCRAM_ITERATIONS)
            self._upsertions.append((user, SCRAM_SHA_512, SCRAM_ITERATIONS, salt, salted, {}))

    def build(
        self, request_struct_class: type[AlterUserScramCredentialsRequest_v0]
    ) -> AlterUserScramCredentialsRequest_v0:
        return request_struct_class([], self._upsertions, {})


class KafkaAccessError(RuntimeError):
    pass


async def apply(options: dict[str, Any], passwords: dict[str, str], *, acls: bool = True) -> None:
    """Upsert every user's SCRAM credential and create the ACLs, as the client `options` describe
    (kota-admin; or no SASL at all on a broker still without an authorizer, see deploy/kafka.py)."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(request_timeout_ms=15_000, **options)
    await client.bootstrap()
    try:
        node = client.get_random_node()
        scram = await client.send(node, AlterUserScramCredentials(passwords))
        failed = [(r[0], r[2]) for r in scram.results if r[1] != 0]
        if failed:
            raise KafkaAccessError(f"Kafka refused SCRAM credentials: {failed}")
        if acls:
            created = await client.send(node, CreateAcls(ACLS))
            failed = [r[1] for r in created.results if r[0] != 0]
            if failed:
                raise KafkaAccessError(f"Kafka refused ACLs: {failed}")
    finally:
        await client.close()
