"""Why a Hugging Face Hub request failed, in one sentence a user can act on.

huggingface_hub retries a connection error five times with backoff (1 + 2 + 4 + 8 + 8 s in
`utils._http._http_backoff_base`, reached from `HfApi.list_repo_files` through `paginate` ->
`http_backoff`), so a machine without network waited 23 s for a dataset's error. The loaders
therefore make their first request with a call that does not retry (`HfApi.dataset_info`, and
`snapshot_download`'s own `repo_info`): an unreachable Hub is known after one attempt, the local
Hub cache is used when it holds the files, and otherwise `describe` names the problem:

- offline mode: `HF_HUB_OFFLINE=1` is set, so nothing was asked;
- unreachable: no network, DNS, proxy or timeout;
- not found: HTTP 404, or 401 on a repository that does not exist or is private;
- auth: HTTP 403 or a gated repository: accept its terms and log in (`hf auth login`, HF_TOKEN).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # a Hub repo id, owner/name
OFFLINE, UNREACHABLE, NOT_FOUND, AUTH, OTHER = "offline", "unreachable", "not_found", "auth", "other"


def offline_mode() -> bool:
    """True when huggingface_hub is in offline mode (HF_HUB_OFFLINE=1): it makes no request."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The connection and timeout errors of the HTTP libraries huggingface_hub has used."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors)


def network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the Hub cannot be reached or refuses the request."""
    from huggingface_hub.errors import HfHubHTTPError

    http = []
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP library changed over versions
        try:
            http.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return (HfHubHTTPError, OSError, *http, *_transport_errors())


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and the errors it was raised from (huggingface_hub wraps the first failure)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def failure(error: BaseException | None) -> str:
    """The kind of a Hub failure: OFFLINE, UNREACHABLE, NOT_FOUND, AUTH or OTHER."""
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    if error is None:
        return OFFLINE if offline_mode() else OTHER
    chain = list(_chain(error))
    for e in chain:
        if isinstance(e, OfflineModeIsEnabled):
            return OFFLINE
        if isinstance(e, GatedRepoError) or _status(e) == 403:
            return AUTH
        if isinstance(e, RepositoryNotFoundError) or _status(e) == 404:
            return NOT_FOUND
        if _status(e) == 401:
            return AUTH
    transport = _transport_errors()
    if any(isinstance(e, transport) for e in chain):
        return UNREACHABLE
    return OFFLINE if offline_mode() else OTHER


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def describe(error: BaseException | None, repo: str, what: str = "model") -> str:
    """One sentence on why `what` (model or dataset) `repo` could not be had from the Hub or
    the local Hub cache; the caller adds its alternative (a local file or folder)."""
    kind = failure(error)
    page = f"https://huggingface.co/{'datasets/' if what == 'dataset' else ''}{repo}"
    if kind == OFFLINE:
        return (f"offline mode is on (HF_HUB_OFFLINE=1) and {what} {repo!r} is not in the local "
                "Hugging Face cache; unset HF_HUB_OFFLINE to download it")
    if kind == UNREACHABLE:
        root = next(e for e in _chain(error) if isinstance(e, _transport_errors()))
        return (f"the Hugging Face Hub cannot be reached ({_first_line(root)}) and {what} "
                f"{repo!r} is not in the local Hugging Face cache; check the network (or proxy)")
    if kind == NOT_FOUND:
        private = " (or it is private: log in with `hf auth login` or set HF_TOKEN)" if _status(
            next((e for e in _chain(error) if _status(e)), error)) == 401 else ""
        return f"{what} {repo!r} does not exist on the Hugging Face Hub{private}; check the id"
    if kind == AUTH:
        return (f"{what} {repo!r} is gated or private and this machine may not read it; accept "
                f"its terms on {page} and log in with `hf auth login` (or set HF_TOKEN)")
    reason = _first_line(error) if error is not None else "unknown error"
    return f"could not get {what} {repo!r} from the Hugging Face Hub ({reason})"
