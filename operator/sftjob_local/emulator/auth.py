"""Authentication: who a request comes from, as a real apiserver with token auth decides it.

* ``Authorization: Bearer <admin token>`` → the cluster admin (group ``system:masters``, which
  the RBAC authorizer lets do anything, as on a real server).
* ``Authorization: Bearer <service-account token>`` → ``system:serviceaccount:<ns>:<name>`` with
  groups ``system:serviceaccounts``, ``system:serviceaccounts:<ns>``, ``system:authenticated``.
  Tokens are JWT-shaped and HMAC-signed (HS256) by this emulator (``TokenAuthority``); they are
  bound to the ServiceAccount's uid (and to a Pod's uid when requested for one), so a deleted or
  re-created ServiceAccount (or Pod) invalidates them, as the real token authenticator does.
* any other bearer token → 401 Unauthorized;
* no token → ``system:anonymous`` (group ``system:unauthenticated``): anonymous auth is on by
  default in kube-apiserver, and RBAC then lets it read only what ``system:public-info-viewer``
  grants (/healthz, /livez, /readyz, /version).

Sources: https://kubernetes.io/docs/reference/access-authn-authz/authentication/ (anonymous
requests, service account tokens); pkg/serviceaccount/claims.go (the ``kubernetes.io`` claims);
pkg/registry/core/serviceaccount/storage/token.go (TokenRequest defaults, 3607 s extension).
"""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from . import errors
from .errors import ApiError

ISSUER = "https://kubernetes.default.svc.cluster.local"
API_AUDIENCES = [ISSUER]
DEFAULT_EXPIRATION_SECONDS = 3600
MIN_EXPIRATION_SECONDS = 600
# kubelets ask for 3607 s; the apiserver (--service-account-extend-token-expiration, the default)
# issues them for a year so that old clients that never re-read the file keep working.
KUBELET_EXPIRATION_SECONDS = 3607
EXTENDED_EXPIRATION_SECONDS = 365 * 24 * 3600

ADMIN_NAME = "sftjob-local-admin"
MASTERS = "system:masters"
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"


@dataclasses.dataclass(frozen=True)
class UserInfo:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: dict[str, list[str]] = dataclasses.field(default_factory=dict, compare=False)

    def as_status(self) -> dict[str, Any]:
        """The ``userInfo`` of a SelfSubjectReview / TokenReview."""
        info: dict[str, Any] = {"username": self.name, "groups": list(self.groups)}
        if self.uid:
            info["uid"] = self.uid
        if self.extra:
            info["extra"] = {k: list(v) for k, v in self.extra.items()}
        return info


ANONYMOUS = UserInfo("system:anonymous", (UNAUTHENTICATED,))
ADMIN = UserInfo(ADMIN_NAME, (MASTERS, AUTHENTICATED))

# The user of the request being served, for admission checks deep in ApiCore. None when the
# emulator itself writes (bootstrap, garbage collection): those are not subject to admission.
current_user: contextvars.ContextVar[UserInfo | None] = contextvars.ContextVar(
    "sftjob_emulator_user", default=None
)


def service_account_username(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def service_account_user(
    namespace: str, name: str, uid: str, extra: dict[str, list[str]] | None = None
) -> UserInfo:
    return UserInfo(
        service_account_username(namespace, name),
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED),
        uid,
        extra or {},
    )


def unauthorized() -> ApiError:
    # filters/authentication.go: apierrors.NewUnauthorized("Unauthorized"), no details.
    return ApiError(401, "Unauthorized", "Unauthorized")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class TokenAuthority:
    """Issues and verifies service-account tokens (HS256 JWTs signed with ``signing_key``)."""

    def __init__(self, signing_key: str | bytes) -> None:
        self._key = signing_key.encode() if isinstance(signing_key, str) else signing_key

    def _sign(self, signing_input: str) -> str:
        return _b64(hmac.new(self._key, signing_input.encode(), hashlib.sha256).digest())

    def issue(
        self,
        service_account: dict[str, Any],
        audiences: list[str],
        expiration_seconds: int,
        pod: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> tuple[str, int]:
        """A token for the ServiceAccount (optionally bound to a Pod); returns (token, exp)."""
        issued = int(now if now is not None else time.time())
        meta = service_account["metadata"]
        private: dict[str, Any] = {
            "namespace": meta["namespace"],
            "serviceaccount": {"name": meta["name"], "uid": meta["uid"]},
        }
        if pod is not None:
            private["pod"] = {"name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
        claims = {
            "aud": audiences,
            "exp": issued + expiration_seconds,
            "iat": issued,
            "iss": ISSUER,
            "jti": secrets.token_hex(16),
            "kubernetes.io": private,
            "nbf": issued,
            "sub": service_account_username(meta["namespace"], meta["name"]),
        }
        header = _b64(json.dumps({"alg": "HS256", "kid": "sftjob-local", "typ": "JWT"}).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{header}.{body}"
        return f"{signing_input}.{self._sign(signing_input)}", claims["exp"]

    def verify(self, token: str, now: float | None = None) -> dict[str, Any] | None:
        """The token's claims when it is ours, unexpired and meant for this API; else None."""
        parts = token.split(".")
        if len(parts) != 3:
            return None
        if not hmac.compare_digest(self._sign(f"{parts[0]}.{parts[1]}"), parts[2]):
            return None
        try:
            claims = json.loads(_unb64(parts[1]))
        except ValueError:
            return None
        moment = now if now is not None else time.time()
        if not isinstance(claims, dict) or claims.get("iss") != ISSUER:
            return None
        if not (claims.get("nbf", 0) <= moment < claims.get("exp", 0)):
            return None
        if not set(claims.get("aud") or []) & set(API_AUDIENCES):
            return None
        return claims


# (namespace, name) → stored object or None
Lookup = Callable[[str, str], dict[str, Any] | None]


def user_from_claims(
    claims: dict[str, Any], service_accounts: Lookup, pods: Lookup
) -> UserInfo | None:
    """The user of a verified token, if what it is bound to still exists with the same uid."""
    private = claims.get("kubernetes.io") or {}
    namespace = private.get("namespace", "")
    sa_ref = private.get("serviceaccount") or {}
    sa = service_accounts(namespace, sa_ref.get("name", ""))
    if sa is None or sa["metadata"]["uid"] != sa_ref.get("uid"):
        return None
    extra: dict[str, list[str]] = {}
    pod_ref = private.get("pod")
    if pod_ref:
        pod = pods(namespace, pod_ref.get("name", ""))
        if pod is None or pod["metadata"]["uid"] != pod_ref.get("uid"):
            return None
        extra = {
            "authentication.kubernetes.io/pod-name": [pod_ref["name"]],
            "authentication.kubernetes.io/pod-uid": [pod_ref["uid"]],
        }
    if claims.get("jti"):
        extra["authentication.kubernetes.io/credential-id"] = [f"JTI={claims['jti']}"]
    return service_account_user(namespace, sa_ref["name"], sa_ref["uid"], extra)


def authenticate(
    authorization: str | None,
    admin_token: str,
    authority: TokenAuthority,
    service_accounts: Lookup,
    pods: Lookup,
) -> UserInfo:
    """The user of a request from its Authorization header; raises 401 for a bad token."""
    if not authorization:
        return ANONYMOUS
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        # Basic auth and other schemes are not configured on this server: nothing authenticates.
        raise unauthorized()
    if hmac.compare_digest(token.encode(), admin_token.encode()):
        return ADMIN
    claims = authority.verify(token)
    user = user_from_claims(claims, service_accounts, pods) if claims else None
    if user is None:
        raise unauthorized()
    return user


def token_request_expiration(spec: dict[str, Any], bound_to_pod: bool) -> tuple[int, int]:
    """(requested seconds, issued seconds) of a TokenRequest; 422 below the minimum."""
    requested = spec.get("expirationSeconds")
    requested = DEFAULT_EXPIRATION_SECONDS if requested is None else int(requested)
    problem = (
        "may not specify a duration less than 10 minutes"
        if requested < MIN_EXPIRATION_SECONDS
        else "may not specify a duration larger than 2^32 seconds"
        if requested > 2**32
        else None
    )
    if problem:
        # pkg/apis/authentication/validation: ValidateTokenRequest, NewInvalid(TokenRequest, "").
        raise errors.invalid(
            "TokenRequest",
            "authentication.k8s.io",
            "",
            [
                {
                    "reason": "FieldValueInvalid",
                    "message": f"Invalid value: {requested}: {problem}",
                    "field": "spec.expirationSeconds",
                }
            ],
        )
    issued = (
        EXTENDED_EXPIRATION_SECONDS
        if bound_to_pod and requested == KUBELET_EXPIRATION_SECONDS
        else requested
    )
    return requested, issued
