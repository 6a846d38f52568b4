"""gateway.oidc.idp against the real test IdP (npm oidc-provider over TLS, tests/oidc_idp.py).

Device flow from start to ID token, verified with the keys fetched from the
IdP; a disabled user's refresh refused; a replayed device code refused; a key
rotation at the IdP picked up through the unknown-kid refresh.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from gateway.config import OIDCConfig, OIDCProvider
from gateway.errors import Reason, SignInError
from gateway.observability.metrics import OIDC_UNKNOWN_KID_REFRESHES
from gateway.oidc.idp import IdP, idp_ssl_context
from gateway.oidc.idtoken import map_user
from tests.certs_for_tests import CertAuthority
from tests.oidc_idp import MFA_ACR, IdPServer, IdPUser, signing_jwks


def _provider(idp: IdPServer, name: str) -> OIDCProvider:
    return OIDCProvider(
        name=name,
        issuer=idp.issuer,
        client_id="gateway",
        audiences=("gateway",),
        ca=idp.ca_path,
    )


async def _device_sign_in(gateway_idp: IdP, idp: IdPServer, login: str, otp: str | None = None):  # type: ignore[no-untyped-def]
    started = await gateway_idp.start_device_flow()
    assert started["verification_uri"].startswith(idp.issuer)
    with pytest.raises(SignInError) as pending:
        await gateway_idp.poll_device(started["device_code"])
    assert pending.value.reason is Reason.AUTHORIZATION_PENDING
    await trio.to_thread.run_sync(lambda: idp.approve_device(started["user_code"], login, otp=otp))
    answer = await gateway_idp.poll_device(started["device_code"])
    return started["device_code"], answer


async def test_device_flow_refresh_disable_replay(tmp_path: Path) -> None:
    users = {
        "alice": IdPUser("sub-alice", "pw-a", ["engineering"], otp="111222"),
        "carol": IdPUser("sub-carol", "pw-c", ["legal"]),
    }
    idp = IdPServer(tmp_path / "idp", CertAuthority.create("IdP CA"), users)
    await trio.to_thread.run_sync(idp.start)
    try:
        provider = _provider(idp, "itest")
        async with httpx.AsyncClient(verify=idp_ssl_context(provider), timeout=10) as http:
            gateway_idp = IdP(provider, OIDCConfig(providers=(provider,)), http=http)
            device_code, answer = await _device_sign_in(gateway_idp, idp, "alice", otp="111222")
            assert answer.id_token is not None
            assert answer.refresh_token is not None
            token = await gateway_idp.verify(answer.id_token)
            assert str(map_user(token, provider, "acme.example")) == "alice@acme.example"
            assert token.acr == MFA_ACR
            assert token.groups("groups") == {"engineering"}

            # the device code is spent
            with pytest.raises(SignInError) as replay:
                await gateway_idp.poll_device(device_code)
            assert replay.value.reason is Reason.DEVICE_CODE_INVALID

            _, carol = await _device_sign_in(gateway_idp, idp, "carol")
            assert carol.refresh_token is not None
            again = await gateway_idp.refresh(carol.refresh_token)
            assert again.id_token is not None
            assert (await gateway_idp.verify(again.id_token)).subject == "sub-carol"
            idp.disable("carol")
            assert again.refresh_token is not None
            with pytest.raises(SignInError) as refused:
                await gateway_idp.refresh(again.refresh_token)
            assert refused.value.reason is Reason.REFRESH_REFUSED
    finally:
        idp.stop()


async def test_key_rotation_at_the_idp(tmp_path: Path) -> None:
    ca = CertAuthority.create("IdP CA")
    users = {"alice": IdPUser("sub-alice", "pw-a")}
    idp = IdPServer(tmp_path / "one", ca, users, jwks=signing_jwks("old"))
    await trio.to_thread.run_sync(idp.start)
    try:
        provider = _provider(idp, "rotation")
        async with httpx.AsyncClient(verify=idp_ssl_context(provider), timeout=10) as http:
            gateway_idp = IdP(provider, OIDCConfig(providers=(provider,)), http=http)
            _, first = await _device_sign_in(gateway_idp, idp, "alice")
            assert first.id_token is not None
            await gateway_idp.verify(first.id_token)
            # the IdP restarts on the same address with a new signing key
            idp.stop()
            rotated = IdPServer(
                tmp_path / "two", ca, users, jwks=signing_jwks("new"), port=idp.port
            )
            await trio.to_thread.run_sync(rotated.start)
            idp = rotated
            _, second = await _device_sign_in(gateway_idp, idp, "alice")
            assert second.id_token is not None
            before = OIDC_UNKNOWN_KID_REFRESHES.labels("rotation", "refetched")._value.get()
            assert (await gateway_idp.verify(second.id_token)).subject == "sub-alice"
            after = OIDC_UNKNOWN_KID_REFRESHES.labels("rotation", "refetched")._value.get()
            assert after == before + 1
    finally:
        idp.stop()
