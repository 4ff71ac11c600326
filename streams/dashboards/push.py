"""``modelwatch dashboards push``: upload the dashboards to a Grafana, into one folder.

Idempotent: the folder has a uid derived from its name and each dashboard a fixed
uid, and every upload overwrites, so pushing twice leaves one copy of each.
"""

from __future__ import annotations

import os
import re
import sys
from urllib.parse import urlsplit, urlunsplit

from streams.tabular import UserError

TOKEN_ENV = "MODELWATCH_GRAFANA_TOKEN"
DEFAULT_FOLDER = "modelwatch"


def folder_uid(name: str) -> str:
    """A Grafana folder uid (40 chars at most, ``[A-Za-z0-9_-]``) from a folder name.

    >>> folder_uid("Security / ML models")
    'security-ml-models'
    """
    uid = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")[:40]
    return uid or DEFAULT_FOLDER


def _public(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def push(url: str, folder: str = DEFAULT_FOLDER, token: str | None = None,
         dashboards: dict[str, dict] | None = None, timeout_s: float = 10.0) -> list[str]:
    """Upload ``dashboards`` (default: all of them) into ``folder``; returns the uids pushed.

    Credentials: ``token`` (a service-account token), else ``user:password@`` in the URL.
    """
    try:
        from grafana_client import GrafanaApi
        from grafana_client.client import GrafanaClientError, GrafanaException
    except ImportError:
        raise UserError("dashboards push needs grafana-client: "
                        "pip install grafana-client") from None

    from streams.dashboards import build_all

    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise UserError(f"dashboards push: --url: {_public(url)!r}: expected http(s)://host[:port][/path]")
    api = GrafanaApi.from_url(url, credential=token or None, timeout=timeout_s)
    dashboards = build_all() if dashboards is None else dashboards
    where = _public(url)
    try:
        uid = _ensure_folder(api, folder, GrafanaClientError)
        pushed = []
        for doc in dashboards.values():
            api.dashboard.update_dashboard({
                "dashboard": {**doc, "id": None}, "folderUid": uid, "overwrite": True,
                "message": "modelwatch dashboards push"})
            pushed.append(doc["uid"])
    except GrafanaException as exc:
        status = f"HTTP {exc.status_code}: " if exc.status_code else ""
        raise UserError(f"dashboards push: {where}: {status}{_one_line(exc.message)}") from None
    except OSError as exc:  # connection refused, DNS, TLS (niquests errors are OSErrors)
        raise UserError(f"dashboards push: {where}: cannot connect: {_cause(exc)}") from None
    return pushed


def _ensure_folder(api, name: str, client_error) -> str:
    """The uid of the folder called ``name``, created when missing."""
    uid = folder_uid(name)
    try:
        api.folder.get_folder(uid)
        return uid
    except client_error as exc:
        if exc.status_code != 404:
            raise
    try:
        api.folder.create_folder(name, uid=uid)
        return uid
    except client_error as exc:
        if exc.status_code not in (409, 412):
            raise
    # A folder of that name made by hand has another uid: use it.
    for existing in api.folder.get_all_folders():
        if existing.get("title") == name:
            return existing["uid"]
    raise UserError(f"dashboards push: folder {name!r}: exists but cannot be found")


def _cause(exc: OSError) -> str:
    """The OS's reason inside the HTTP client's long message, when there is one."""
    text = _one_line(str(exc))
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if match:
        return match.group(1).strip()
    match = re.search(r"Failed to resolve '([^']+)'", text)
    return f"unknown host {match.group(1)}" if match else text


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _push_command(args) -> int:
    token = os.environ.get(TOKEN_ENV) or None
    pushed = push(args.url, args.folder, token)
    print(f"dashboards: {len(pushed)} pushed to folder {args.folder!r} at {_public(args.url)} "
          f"({', '.join(pushed)})", file=sys.stderr)
    return 0


def add_dashboards_parser(subparsers) -> None:
    """Register ``dashboards push`` on the ``modelwatch`` command's subparsers."""
    p = subparsers.add_parser("dashboards", help="Grafana dashboards: push them to a Grafana")
    sub = p.add_subparsers(dest="dashboards_command", metavar="push", required=True,
                           parser_class=type(p))  # keeps the CLI's one-line errors
    push_parser = sub.add_parser(
        "push", help="upload the dashboards into a folder (same uid overwrites)",
        description=f"Credentials: a service-account token in {TOKEN_ENV}, or "
                    "user:password@ in the URL.")
    push_parser.add_argument("--url", required=True,
                             help="Grafana base URL, e.g. http://localhost:3000")
    push_parser.add_argument("--folder", default=DEFAULT_FOLDER,
                             help=f"folder to put them in (default {DEFAULT_FOLDER})")
    push_parser.set_defaults(func=_push_command)
