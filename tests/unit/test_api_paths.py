"""The real API's shape in the config: {account_id} in the paths, the User-Agent, and the probe
(`check --api`: a GET outside the batch quota that says what a refusal means)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import respx
from pydantic import SecretStr

import usersyncd
from usersyncd import api, config, errors

URL = "https://api.test"


def drip(**overrides: Any) -> config.ApiConfig:
    values: dict[str, Any] = {
        "url": URL,
        "key": SecretStr("secret-token-1234"),
        "auth": "basic",
        "account_id": 9999999,  # TOML gives Drip's account number as an integer
        "batch_path": "/v2/{account_id}/subscribers/batches",
        "probe_path": "/v2/accounts/{account_id}",
    } | overrides
    return config.ApiConfig(**values)


def test_account_id_fills_the_paths() -> None:
    """`{account_id}` is replaced in the batch and probe paths; an int account id is taken as text."""
    api_config = drip()
    assert api_config.account_id == "9999999"
    assert api_config.resolve(api_config.batch_path) == "/v2/9999999/subscribers/batches"
    assert api_config.resolve(api_config.probe_path) == "/v2/accounts/9999999"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"account_id": ""}, "api.batch_path: uses {account_id} but api.account_id is not set"),
        ({"batch_path": "/v2/{acct}/subscribers/batches"}, "api.batch_path: unknown placeholder {acct}"),
        ({"probe_path": "v2/accounts"}, "api.probe_path: must start with '/'"),
        ({"account_id": "12/../admin"}, "api.account_id: must be letters, digits"),
        ({"user_agent": "my app\nX-Injected: 1"}, "api.user_agent: must be printable ASCII on one line"),
    ],
)
def test_bad_paths_and_names_are_one_line_config_errors(overrides: dict[str, Any], message: str) -> None:
    """Each mistake names its key; nothing reaches the URL unchecked."""
    with pytest.raises(errors.ConfigError) as caught:
        config.load_config(
            None,
            environ={},
            overrides={"database.url": "postgresql://x/db", "api.url": URL}
            | {f"api.{k}": v for k, v in (drip().model_dump() | overrides).items() if k != "key"},
        )
    assert str(caught.value).startswith(message)


@respx.mock
async def test_batches_go_to_the_account_with_the_configured_user_agent() -> None:
    """The batch POST goes to the resolved path; User-Agent is api.user_agent, else usersyncd/VERSION."""
    route = respx.post(f"{URL}/v2/9999999/subscribers/batches").mock(
        return_value=httpx.Response(201, json={})
    )
    async with api.ExternalUserApi(drip(user_agent="Acme sync (ops@acme.test)")) as client:
        outcome = await client.send([{"email": "a@example.com"}])
    assert outcome.kind is api.OutcomeKind.OK
    assert route.calls.last.request.headers["User-Agent"] == "Acme sync (ops@acme.test)"
    async with api.ExternalUserApi(drip()) as client:
        await client.send([{"email": "a@example.com"}])
    assert route.calls.last.request.headers["User-Agent"] == f"usersyncd/{usersyncd.__version__}"


@pytest.mark.parametrize(
    ("status", "ok", "meaning"),
    [
        (200, True, "the key and the account work"),
        (401, False, "HTTP 401: the API refused the key"),
        (403, False, "HTTP 403: the API refused the key"),
        (404, False, "HTTP 404: the account is unknown or the path is wrong"),
        (503, False, "HTTP 503: the API is failing"),
        (302, False, "HTTP 302: unexpected answer"),
    ],
)
@respx.mock
async def test_probe_says_what_an_answer_means(status: int, ok: bool, meaning: str) -> None:
    """A GET of the probe path (basic auth, the key as user name): 2xx is ok, every refusal explained."""
    route = respx.get(f"{URL}/v2/accounts/9999999").mock(
        return_value=httpx.Response(status, json={"errors": [{"code": "x", "message": "secret-token-1234"}]})
    )
    async with api.ExternalUserApi(drip()) as client:
        probe = await client.probe()
    assert probe.ok is ok and probe.status == status
    assert probe.meaning.startswith(meaning)
    request = route.calls.last.request
    assert request.method == "GET" and request.headers["Authorization"].startswith("Basic ")
    assert "secret-token-1234" not in (probe.body_excerpt or "")


@respx.mock
async def test_probe_without_an_answer_points_at_the_url() -> None:
    """A refused connection: not ok, no status, and the meaning names api.url."""
    respx.get(f"{URL}/v2/accounts/9999999").mock(side_effect=httpx.ConnectError("refused"))
    async with api.ExternalUserApi(drip()) as client:
        probe = await client.probe()
    assert not probe.ok and probe.status is None
    assert probe.meaning.startswith("no answer (connection error: refused)") and "api.url" in probe.meaning
