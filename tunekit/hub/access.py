"""Reaching the Hub: endpoint, offline mode, the token, who it belongs to, one-line errors.

The token comes from ``HF_TOKEN`` or the cached login (``hf auth login``),
read by huggingface_hub at each request and sent only in the Authorization
header: tunekit never takes it as an argument or config field, never holds it
in a variable it prints or writes, and scrubs it from every message it raises.
``HF_ENDPOINT`` (a private Hub) is read at call time, so it works even when
huggingface_hub was imported before it was set.
"""

from __future__ import annotations

import os
import re

__all__ = ["PushError", "check_online", "hub_api", "hub_endpoint", "hub_failure", "parse_repo_id", "require_token",
           "writable_namespace"]


class PushError(ValueError):
    """A push that cannot happen or did not happen; one line naming the problem and the fix."""


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` as set now (else huggingface_hub's default), without a trailing slash."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_online() -> None:
    """Refuse early in offline mode (``HF_HUB_OFFLINE=1``), before anything is planned."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if constants.is_offline_mode() or flag.upper() in constants.ENV_VARS_TRUE_VALUES:
        raise PushError("offline mode is on (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to push to the Hub")


def require_token() -> None:
    """Fail unless ``HF_TOKEN`` or a cached login provides a token (its value is never returned)."""
    from huggingface_hub import get_token

    if get_token() is None:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (tunekit never reads a token "
                        "from a config file or the command line)")


def hub_api(api=None):
    """The injected client, or an ``HfApi`` on ``hub_endpoint()`` that reads the token per request."""
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint())


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_repo_id(repo_id: str, what: str = "--repo") -> str:
    """``repo_id`` if it is ``namespace/name`` as the Hub accepts it, else a one-line PushError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = (repo_id or "").strip()
    try:
        validate_repo_id(text)
    except HFValidationError as err:
        raise PushError(f"{what}={repo_id!r} is not a Hub repo id ({str(err).splitlines()[0]}); "
                        "write it as user/name or org/name") from None
    if not _REPO_ID.match(text):
        raise PushError(f"{what}={repo_id!r} is not a Hub repo id; write it as user/name or org/name")
    return text


def hub_failure(action: str, err: BaseException) -> PushError:
    """``err`` from huggingface_hub as one line (status and the Hub's own message), token scrubbed."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        detail = f"HTTP {err.response.status_code}"
        if err.server_message:
            detail += f": {' '.join(err.server_message.split())}"
    else:
        detail = " ".join(str(err).split()) or type(err).__name__
    return PushError(scrub(f"{action} failed ({detail[:300]})"))


def scrub(text: str) -> str:
    """``text`` with the current token (if any) replaced, for anything tunekit prints or raises."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "<token>") if token else text


def writable_namespace(api, repo_id: str) -> str:
    """Check (``whoami``) that the token may write to ``repo_id``'s namespace; return the user name."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        me = api.whoami()
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code == 401:
            raise PushError("the Hub rejected the token (HTTP 401): set a valid HF_TOKEN or run "
                            "`hf auth login`") from None
        raise hub_failure("checking the token (whoami)", err) from None
    except OSError as err:
        raise hub_failure(f"reaching the Hub at {hub_endpoint()}", err) from None
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PushError("the token is read-only: create a write token at https://huggingface.co/settings/tokens "
                        "and set HF_TOKEN")
    namespace = repo_id.split("/")[0]
    orgs = {org.get("name"): org.get("roleInOrg") for org in me.get("orgs") or []}
    if namespace != me.get("name") and orgs.get(namespace) not in ("admin", "write", "contributor"):
        yours = ", ".join([me.get("name", "?"), *sorted(o for o, r in orgs.items() if r in ("admin", "write"))])
        why = "your role there is read-only" if namespace in orgs else "it is neither your user nor one of your orgs"
        raise PushError(f"cannot push to {repo_id}: {why}; namespaces you can write to: {yours}")
    return me.get("name", "")
