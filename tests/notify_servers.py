"""Real servers the notifier talks to in tests: aiosmtpd (STARTTLS with a self-signed certificate,
AUTH LOGIN/PLAIN required), a webhook receiver that verifies signatures as docs/notifications.md
tells a receiver to, and a stand-in for Telegram's Bot API (sendMessage, getUpdates,
answerCallbackQuery, in the documented JSON)."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kota.settings import PROJECT_ROOT
from tests.helpers import free_port


def documented_verifier() -> Any:
    """`verify_kota_webhook` exactly as docs/notifications.md gives it to receivers."""
    [code] = re.findall(r"```python\n(.*?)```", (PROJECT_ROOT / "docs" / "notifications.md").read_text(), flags=re.S)
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # noqa: S102 - our own documentation, run as a receiver would
    return namespace["verify_kota_webhook"]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "smtp.crt", folder / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@dataclass
class Mailbox:
    """What the SMTP server accepted: (authenticated user, envelope recipients, parsed message)."""

    user: str
    password: str
    received: list[tuple[str, list[str], Any]] = field(default_factory=list)
    failed_logins: int = 0

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and (auth_data.login.decode(), auth_data.password.decode()) == (
            self.user,
            self.password,
        ):
            return AuthResult(success=True, auth_data=auth_data)
        self.failed_logins += 1
        return AuthResult(success=False, handled=False)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        assert session.ssl is not None, "mail sent without STARTTLS"
        user = session.auth_data.login.decode() if session.auth_data else ""
        self.received.append((user, list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 OK"


def start_smtp(folder: Path, user: str, password: str) -> tuple[Controller, Mailbox, int, Path]:
    import ssl

    cert, key = self_signed(folder)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    mailbox = Mailbox(user, password)
    port = free_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        auth_required=True,
        authenticator=mailbox.authenticate,
    )
    controller.start()
    return controller, mailbox, port, cert


class _Server(ThreadingHTTPServer):
    daemon_threads = True


@dataclass
class WebhookReceiver:
    """Accepts a POST only when its signature verifies; `delay_first` holds the first request that
    long before answering (a notifier killed meanwhile has sent but not recorded it)."""

    secret: str
    verified: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0
    delay_s: float = 0.0
    fail_with: int | None = None
    port: int = 0

    def start(self) -> _Server:
        receiver = self
        verify = documented_verifier()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ok = verify(receiver.secret, dict(self.headers.items()), body)
                if not ok:
                    receiver.rejected += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                receiver.verified.append(json.loads(body))
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                self.send_response(receiver.fail_with or 204)
                self.end_headers()

        server = _Server(("127.0.0.1", 0), Handler)
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@dataclass
class TelegramStandIn:
    """Telegram's Bot API for one bot, as documented (https://core.telegram.org/bots/api): every
    answer is {"ok": true, "result": ...} or {"ok": false, "error_code", "description"}."""

    token: str
    sent: list[dict[str, Any]] = field(default_factory=list)
    answered: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    _next_update: int = 1000

    def press(self, message: dict[str, Any], button: int = 0, user: str = "budi_bpbd") -> None:
        """A person pressing an inline button of a message the bot sent."""
        data = message["reply_markup"]["inline_keyboard"][0][button]["callback_data"]
        self._next_update += 1
        self.updates.append(
            {
                "update_id": self._next_update,
                "callback_query": {
                    "id": f"cq{self._next_update}",
                    "from": {"id": 4242, "is_bot": False, "first_name": "Budi", "username": user},
                    "message": {"message_id": message["message_id"], "chat": {"id": int(message["chat_id"])}},
                    "chat_instance": "1",
                    "data": data,
                },
            }
        )

    def start(self) -> _Server:
        bot = self
        path = re.compile(r"^/bot([^/]+)/(\w+)$")

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                match = path.match(self.path)
                if match is None or match[1] != bot.token:
                    self._answer(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
                    return
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                method = match[2]
                if method == "sendMessage":
                    if "chat_id" not in request or not request.get("text"):
                        self._answer(400, {"ok": False, "error_code": 400, "description": "Bad Request"})
                        return
                    message = {**request, "message_id": len(bot.sent) + 1}
                    bot.sent.append(message)
                    self._answer(
                        200,
                        {
                            "ok": True,
                            "result": {
                                "message_id": message["message_id"],
                                "date": 0,
                                "chat": {"id": int(request["chat_id"])},
                                "text": request["text"],
                            },
                        },
                    )
                elif method == "getUpdates":
                    offset = int(request.get("offset", 0))
                    self._answer(200, {"ok": True, "result": [u for u in bot.updates if u["update_id"] >= offset]})
                elif method == "answerCallbackQuery":
                    bot.answered.append(request)
                    self._answer(200, {"ok": True, "result": True})
                else:
                    self._answer(404, {"ok": False, "error_code": 404, "description": "Not Found"})

        server = _Server(("127.0.0.1", 0), Handler)
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
