"""A fake Kubernetes API server for tests: speaks the HTTP/JSON protocol that client-go and
kube-rs use (discovery, get, list with selectors and consistent paging, watch with bookmarks,
resume and "410 Gone", create/update/patch/delete) for a handful of resource types, keeps
everything in memory, and has a second "control" listener through which a test changes
objects and injects faults (cut watches, compaction, the server going down and up).

usage: fake_apiserver.py --port-file P --control-port-file C [--port N]
                         [--bookmark-interval SECONDS] [--exit-on-stdin-eof] [--quiet]

Served resources: core/v1 services (namespaced), nodes (cluster), events (namespaced);
discovery.k8s.io/v1 endpointslices (namespaced); events.k8s.io/v1 events (namespaced).

Control API (JSON, on the control port):
  PUT    /objects                          one object (apiVersion, kind, metadata): create or
                                           replace, like a controller writing it -> ADDED/MODIFIED
  PUT    /objects/bulk                     a JSON array of objects, one event each
  GET    /objects/{resource}               the stored objects of a resource
  DELETE /objects/{resource}/{ns|_}/{name} -> DELETED
  POST   /cut-watches                      abruptly close every open watch connection
  POST   /pause-watches, /resume-watches   hold event delivery to watches (and new watches)
  POST   /compact                          forget the event history before the current
                                           resourceVersion: older watches/continue tokens get 410
  POST   /down, /up                        close the API listener and all API connections /
                                           listen again on the same port
  GET    /stats                            request counts {"list","watch","other",...}, open
                                           watches, bookmarks sent
  POST   /reset-stats
  GET    /events                           Event objects created through the API
Stdlib only.
"""

import argparse
import base64
import bisect
import copy
import datetime
import json
import os
import random
import re
import socket
import socketserver
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LOG_QUIET = False


def log(msg):
    if not LOG_QUIET:
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        sys.stderr.flush()


def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# Resource types


class ResourceType:
    def __init__(self, group, version, plural, kind, namespaced, short_names=(), fields=()):
        self.group = group
        self.version = version
        self.plural = plural
        self.singular = kind.lower()
        self.kind = kind
        self.list_kind = kind + "List"
        self.namespaced = namespaced
        self.short_names = list(short_names)
        # Field selector labels beyond metadata.name / metadata.namespace.
        self.fields = dict(fields)
        self.verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]

    @property
    def api_version(self):
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self):
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def __repr__(self):
        return f"<{self.api_version} {self.plural}>"


RESOURCES = [
    ResourceType(
        "",
        "v1",
        "services",
        "Service",
        True,
        ["svc"],
        {"spec.clusterIP": ("spec.clusterIP", ""), "spec.type": ("spec.type", "")},
    ),
    ResourceType(
        "",
        "v1",
        "nodes",
        "Node",
        False,
        ["no"],
        {"spec.unschedulable": ("spec.unschedulable", "false")},
    ),
    ResourceType(
        "",
        "v1",
        "events",
        "Event",
        True,
        ["ev"],
        {
            f: (f, "")
            for f in [
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ]
        },
    ),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    ResourceType(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        True,
        ["ev"],
        {
            "regarding.kind": ("regarding.kind", ""),
            "regarding.namespace": ("regarding.namespace", ""),
            "regarding.name": ("regarding.name", ""),
            "reason": ("reason", ""),
            "type": ("type", ""),
        },
    ),
]
BY_PATH = {(rt.group, rt.version, rt.plural): rt for rt in RESOURCES}
BY_KIND = {(rt.api_version, rt.kind): rt for rt in RESOURCES}
# Group order in /apis; the first version listed for a group is its preferred version.
GROUPS = ["discovery.k8s.io", "events.k8s.io"]


def control_resource(name):
    """Control API resource names: plural ("services"; "events" is core/v1) or plural.group."""
    for rt in RESOURCES:
        if name in (rt.plural, rt.qualified):
            return rt
    return None


# --------------------------------------------------------------------------------------------
# Errors as Kubernetes Status objects


class ApiError(Exception):
    def __init__(self, code, reason, message, details=None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self):
        return status_object(self.code, self.reason, self.message, self.details)


def status_object(code, reason, message, details=None):
    st = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        st["details"] = details
    return st


def not_found(rt, name):
    details = {"name": name, "kind": rt.plural}
    if rt.group:
        details["group"] = rt.group
    return ApiError(404, "NotFound", f'{rt.qualified} "{name}" not found', details)


def path_not_found():
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def bad_request(message):
    return ApiError(400, "BadRequest", message)


def invalid(rt, name, message):
    details = {"name": name, "kind": rt.kind}
    if rt.group:
        details["group"] = rt.group
    qualified_kind = f"{rt.kind}.{rt.group}" if rt.group else rt.kind
    return ApiError(422, "Invalid", f'{qualified_kind} "{name}" is invalid: {message}', details)


def invalid_list_options(message):
    # What ValidateListOptions failures look like from the real server.
    return ApiError(
        422,
        "Invalid",
        f'ListOptions.meta.k8s.io "" is invalid: {message}',
        {"group": "meta.k8s.io", "kind": "ListOptions", "causes": [{"reason": "FieldValueInvalid", "message": message}]},
    )


def method_not_allowed():
    return ApiError(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        {},
    )


def expired(message):
    return ApiError(410, "Expired", message)


# --------------------------------------------------------------------------------------------
# Label and field selectors (k8s.io/apimachinery/pkg/labels and fields semantics)

_LABEL_TOKEN = re.compile(r"\s*(!=|==|=|!|\(|\)|,|>|<|[^\s!=(),<>]+)")


def _tokenize(s):
    pos = 0
    out = []
    s = s.rstrip()
    while pos < len(s):
        m = _LABEL_TOKEN.match(s, pos)
        if not m:
            raise bad_request(f"unable to parse requirement: unexpected character at {pos} in {s!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


_QUALIFIED = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _check_key(key, sel):
    if not _QUALIFIED.match(key) or len(key.split("/")[-1]) > 63:
        raise bad_request(f"unable to parse requirement: invalid label key {key!r} in selector {sel!r}")


def _check_value(value, sel):
    if not _VALUE.match(value) or len(value) > 63:
        raise bad_request(f"unable to parse requirement: invalid label value {value!r} in selector {sel!r}")


def parse_label_selector(sel):
    """Returns a list of (key, op, values) requirements (ANDed)."""
    if sel is None or sel.strip() == "":
        return []
    toks = _tokenize(sel)
    reqs = []
    i = 0
    special = {"!=", "==", "=", "!", "(", ")", ",", ">", "<"}

    def tok(j):
        return toks[j] if j < len(toks) else None

    while i < len(toks):
        if tok(i) == "!":
            key = tok(i + 1)
            if key is None or key in special:
                raise bad_request(f"unable to parse requirement: found {key!r}, expected: identifier after '!'")
            _check_key(key, sel)
            reqs.append((key, "!", ()))
            i += 2
        else:
            key = tok(i)
            if key in special:
                raise bad_request(f"unable to parse requirement: found {key!r}, expected: identifier")
            _check_key(key, sel)
            op = tok(i + 1)
            if op is None or op == ",":
                reqs.append((key, "exists", ()))
                i += 1
            elif op in ("=", "==", "!="):
                value = tok(i + 2)
                if value is None or value == ",":
                    value = ""
                    i += 2
                elif value in special:
                    raise bad_request(f"unable to parse requirement: found {value!r}, expected: identifier")
                else:
                    i += 3
                _check_value(value, sel)
                reqs.append((key, "!=" if op == "!=" else "=", (value,)))
            elif op in (">", "<"):
                value = tok(i + 2)
                if value is None or not re.fullmatch(r"-?[0-9]+", value):
                    raise bad_request(f"unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer")
                reqs.append((key, op, (int(value),)))
                i += 3
            elif op in ("in", "notin"):
                if tok(i + 2) != "(":
                    raise bad_request(f"unable to parse requirement: found {tok(i + 2)!r}, expected: '('")
                j = i + 3
                values = []
                expect_value = True
                while True:
                    t = tok(j)
                    if t is None:
                        raise bad_request("unable to parse requirement: found '', expected: ')'")
                    if t == ")":
                        if expect_value and values:
                            values.append("")
                        j += 1
                        break
                    if t == ",":
                        if expect_value:
                            values.append("")
                        expect_value = True
                    elif t in special:
                        raise bad_request(f"unable to parse requirement: found {t!r}, expected: ',' or ')'")
                    else:
                        if not expect_value:
                            raise bad_request(f"unable to parse requirement: found {t!r}, expected: ',' or ')'")
                        _check_value(t, sel)
                        values.append(t)
                        expect_value = False
                    j += 1
                if not values:
                    raise bad_request("unable to parse requirement: for 'in', 'notin' operators, values set can't be empty")
                reqs.append((key, op, tuple(values)))
                i = j
            else:
                raise bad_request(f"unable to parse requirement: found {op!r}, expected: in, notin, =, ==, !=, gt, lt")
        if i < len(toks):
            if toks[i] != ",":
                raise bad_request(f"found {toks[i]!r}, expected: ',' or 'end of string'")
            i += 1
            if i == len(toks):
                raise bad_request("found '', expected: identifier after ','")
    return reqs


def labels_match(reqs, obj):
    if not reqs:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, values in reqs:
        present = key in labels
        value = labels.get(key)
        if op == "exists":
            ok = present
        elif op == "!":
            ok = not present
        elif op == "=":
            ok = present and value == values[0]
        elif op == "!=":
            ok = not present or value != values[0]
        elif op == "in":
            ok = present and value in values
        elif op == "notin":
            ok = not present or value not in values
        elif op in (">", "<"):
            try:
                n = int(value) if present else None
            except ValueError:
                n = None
            ok = n is not None and (n > values[0] if op == ">" else n < values[0])
        else:
            ok = False
        if not ok:
            return False
    return True


def parse_field_selector(rt, sel):
    """Returns a list of (getter path, default, op, value)."""
    if sel is None or sel.strip() == "":
        return []
    reqs = []
    for term in sel.split(","):
        term = term.strip()
        if not term:
            raise bad_request(f"invalid selector: '{sel}'; can't understand '{term}'")
        m = re.fullmatch(r"([^=!]+?)\s*(!=|==|=)\s*(.*)", term)
        if not m:
            raise bad_request(f"invalid selector: '{sel}'; can't understand '{term}'")
        field, op, value = m.group(1).strip(), m.group(2), m.group(3).strip()
        if field == "metadata.name":
            path, default = "metadata.name", ""
        elif field == "metadata.namespace":
            path, default = "metadata.namespace", ""
        elif field in rt.fields:
            path, default = rt.fields[field]
        else:
            raise bad_request(f"field label not supported: {field}")
        reqs.append((path, default, "!=" if op == "!=" else "=", value))
    return reqs


def _get_path(obj, path, default):
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    if isinstance(cur, bool):
        return "true" if cur else "false"
    if cur is None:
        return default
    return str(cur)


def fields_match(reqs, obj):
    for path, default, op, value in reqs:
        actual = _get_path(obj, path, default)
        if (actual == value) != (op == "="):
            return False
    return True


class Filter:
    def __init__(self, rt, namespace, label_reqs, field_reqs):
        self.rt = rt
        self.namespace = namespace
        self.label_reqs = label_reqs
        self.field_reqs = field_reqs

    def matches(self, obj):
        if obj is None:
            return False
        md = obj.get("metadata") or {}
        if self.namespace is not None and md.get("namespace", "") != self.namespace:
            return False
        return labels_match(self.label_reqs, obj) and fields_match(self.field_reqs, obj)


# --------------------------------------------------------------------------------------------
# Patches


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _container(doc, parts):
    cur = doc
    for p in parts[:-1]:
        if isinstance(cur, list):
            cur = cur[int(p)]
        elif isinstance(cur, dict) and p in cur:
            cur = cur[p]
        else:
            raise ApiError(422, "Invalid", f"doc is missing path: /{'/'.join(parts)}")
    return cur


def json_patch(doc, ops):
    """RFC 6902 JSON patch (add, remove, replace, test, copy, move)."""
    doc = copy.deepcopy(doc)
    if not isinstance(ops, list):
        raise bad_request("json patch must be an array of operations")
    for op in ops:
        kind = op.get("op")
        parts = _pointer(op.get("path", ""))

        def get(parts_):
            c = _container(doc, parts_)
            k = parts_[-1]
            try:
                return c[int(k)] if isinstance(c, list) else c[k]
            except (KeyError, IndexError, ValueError):
                raise ApiError(422, "Invalid", f"doc is missing path: /{'/'.join(parts_)}")

        def remove(parts_):
            c = _container(doc, parts_)
            k = parts_[-1]
            try:
                return c.pop(int(k)) if isinstance(c, list) else c.pop(k)
            except (KeyError, IndexError, ValueError):
                raise ApiError(422, "Invalid", f"doc is missing path: /{'/'.join(parts_)}")

        def add(parts_, value):
            nonlocal doc
            if not parts_:
                doc = value
                return
            c = _container(doc, parts_)
            k = parts_[-1]
            if isinstance(c, list):
                c.insert(len(c) if k == "-" else int(k), value)
            else:
                c[k] = value

        if kind == "add":
            add(parts, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            remove(parts)
        elif kind == "replace":
            remove(parts)
            add(parts, copy.deepcopy(op.get("value")))
        elif kind == "test":
            if get(parts) != op.get("value"):
                raise ApiError(422, "Invalid", f"test operation failed at {op.get('path')}")
        elif kind == "copy":
            add(parts, copy.deepcopy(get(_pointer(op.get("from", "")))))
        elif kind == "move":
            add(parts, remove(_pointer(op.get("from", ""))))
        else:
            raise bad_request(f"unknown json patch operation {kind!r}")
    return doc


# --------------------------------------------------------------------------------------------
# The store: objects, a global resourceVersion, an event history, open watches


class Event:
    __slots__ = ("rv", "rt", "type", "obj", "old")

    def __init__(self, rv, rt, type_, obj, old):
        self.rv = rv
        self.rt = rt
        self.type = type_
        self.obj = obj  # state after the event (for DELETED: last state, stamped with this rv)
        self.old = old  # state before the event (None for ADDED)


def obj_key(obj):
    md = obj.get("metadata") or {}
    return (md.get("namespace", ""), md.get("name", ""))


def with_rv(obj, rv):
    out = dict(obj)
    out["metadata"] = dict(obj.get("metadata") or {})
    out["metadata"]["resourceVersion"] = str(rv)
    return out


def _strip_for_compare(obj):
    o = dict(obj)
    md = dict(o.get("metadata") or {})
    md.pop("resourceVersion", None)
    md.pop("managedFields", None)
    o["metadata"] = md
    return o


class Store:
    HISTORY_LIMIT = 200_000

    def __init__(self):
        self.cond = threading.Condition()
        self.rv = 100
        # Events with rv <= compacted are forgotten.
        self.compacted = self.rv
        self.objects = {rt: {} for rt in RESOURCES}
        self.history = []
        self.paused = False
        self.watches = set()
        self.stats = {}
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"list": 0, "watch": 0, "other": 0, "bookmarks": 0, "resources": {}}

    def count(self, kind, rt=None):
        with self.cond:
            self.stats[kind] += 1
            if rt is not None:
                per = self.stats["resources"].setdefault(rt.qualified, {"list": 0, "watch": 0, "other": 0})
                per[kind] += 1

    # -- writes (callers hold no lock) --

    def _record(self, rt, type_, obj, old):
        ev = Event(self.rv, rt, type_, obj, old)
        self.history.append(ev)
        if len(self.history) > self.HISTORY_LIMIT:
            drop = len(self.history) - self.HISTORY_LIMIT
            self.compacted = self.history[drop - 1].rv
            del self.history[:drop]
        self.cond.notify_all()

    def _stamp(self, rt, obj, existing):
        obj = {"apiVersion": rt.api_version, "kind": rt.kind, "metadata": obj.get("metadata"), **obj}
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        md = dict(obj.get("metadata") or {})
        if not rt.namespaced:
            md.pop("namespace", None)
        if existing is not None:
            emd = existing["metadata"]
            md["uid"] = emd["uid"]
            md["creationTimestamp"] = emd["creationTimestamp"]
        else:
            md["uid"] = str(uuid.uuid4())
            md["creationTimestamp"] = now_rfc3339()
        md.pop("resourceVersion", None)
        obj["metadata"] = md
        return obj

    def create(self, rt, obj):
        with self.cond:
            md = obj["metadata"]
            if not md.get("name") and md.get("generateName"):
                while True:
                    name = md["generateName"] + "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
                    if (md.get("namespace", ""), name) not in self.objects[rt]:
                        break
                obj = dict(obj)
                obj["metadata"] = dict(md, name=name)
            key = obj_key(obj)
            if key in self.objects[rt]:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{rt.qualified} "{key[1]}" already exists',
                    {"name": key[1], "kind": rt.plural, **({"group": rt.group} if rt.group else {})},
                )
            self.rv += 1
            stored = with_rv(self._stamp(rt, obj, None), self.rv)
            self.objects[rt][key] = stored
            self._record(rt, "ADDED", stored, None)
            return stored

    def update(self, rt, key, new_obj_fn, expect_rv=None, create_missing=False):
        """new_obj_fn(existing) -> new object. Returns (stored, created)."""
        with self.cond:
            existing = self.objects[rt].get(key)
            if existing is None and not create_missing:
                raise not_found(rt, key[1])
            new_obj = new_obj_fn(existing)
            rv_given = (new_obj.get("metadata") or {}).get("resourceVersion") if expect_rv is None else expect_rv
            if existing is not None and rv_given and rv_given != existing["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {rt.qualified} "{key[1]}": the object has been modified; '
                    "please apply your changes to the latest version and try again",
                    {"name": key[1], "kind": rt.plural, **({"group": rt.group} if rt.group else {})},
                )
            if obj_key(new_obj) != key:
                raise bad_request("the name of the object does not match the name on the URL")
            stamped = self._stamp(rt, new_obj, existing)
            if existing is not None and _strip_for_compare(stamped) == _strip_for_compare(existing):
                # A no-op update: no new resourceVersion, no event (like the real server).
                return existing, False
            self.rv += 1
            stored = with_rv(stamped, self.rv)
            self.objects[rt][key] = stored
            self._record(rt, "MODIFIED" if existing is not None else "ADDED", stored, existing)
            return stored, existing is None

    def put(self, rt, obj):
        """Control API: create or replace unconditionally (always an event)."""
        with self.cond:
            key = obj_key(obj)
            existing = self.objects[rt].get(key)
            self.rv += 1
            stored = with_rv(self._stamp(rt, obj, existing), self.rv)
            self.objects[rt][key] = stored
            self._record(rt, "MODIFIED" if existing is not None else "ADDED", stored, existing)
            return stored

    def delete(self, rt, key):
        with self.cond:
            existing = self.objects[rt].pop(key, None)
            if existing is None:
                raise not_found(rt, key[1])
            self.rv += 1
            final = with_rv(existing, self.rv)
            self._record(rt, "DELETED", final, existing)
            return final

    def compact(self):
        with self.cond:
            self.compacted = self.rv
            self.history = []
            self.cond.notify_all()
            return self.rv

    # -- reads (caller holds self.cond) --

    def snapshot(self, rt, at_rv):
        """The objects of rt as of resourceVersion at_rv (>= compacted), keyed by (ns, name)."""
        objs = dict(self.objects[rt])
        for ev in reversed(self.history):
            if ev.rv <= at_rv:
                break
            if ev.rt is not rt:
                continue
            key = obj_key(ev.obj)
            if ev.type == "ADDED":
                objs.pop(key, None)
            else:
                objs[key] = ev.old
        return objs

    def events_after(self, rv):
        i = bisect.bisect_right(self.history, rv, key=lambda e: e.rv)
        return self.history[i:]


# --------------------------------------------------------------------------------------------
# The API server


def list_item(obj):
    # Items of a typed list carry no apiVersion/kind, as from the real server.
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}


def encode_continue(rv, start_key):
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": f"{start_key[0]}/{start_key[1]}\u0000"}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_continue(token):
    try:
        pad = "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(token + pad))
        if data.get("v") != "meta.k8s.io/v1":
            raise ValueError("version")
        rv = int(data["rv"])
        start = data["start"]
        if not start.endswith("\u0000"):
            raise ValueError("start")
        ns, _, name = start[:-1].partition("/")
        return rv, (ns, name)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)")


class Watch:
    def __init__(self, conn):
        self.conn = conn
        self.cut = False


def qp(query, name, default=None):
    vals = query.get(name)
    return vals[0] if vals else default


def qbool(query, name):
    v = qp(query, name)
    return v is not None and v.lower() in ("true", "1")


class ApiApp:
    def __init__(self, store, bookmark_interval):
        self.store = store
        self.bookmark_interval = bookmark_interval
        self.lock = threading.Lock()
        self.httpd = None
        self.thread = None
        self.port = None
        self.conns = set()

    # -- listener lifecycle --

    def start(self, port):
        httpd = Server(("127.0.0.1", port), ApiHandler)
        httpd.app = self
        with self.lock:
            self.httpd = httpd
            self.port = httpd.server_address[1]
        self.thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self.port

    def down(self):
        with self.lock:
            httpd, self.httpd = self.httpd, None
        if httpd is None:
            return False
        httpd.shutdown()
        httpd.server_close()
        self.cut_watches()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            _abort(c)
        return True

    def up(self):
        with self.lock:
            if self.httpd is not None:
                return False
        deadline = time.time() + 10
        while True:
            try:
                self.start(self.port)
                return True
            except OSError as e:
                if time.time() > deadline:
                    raise
                log(f"rebinding port {self.port}: {e}; retrying")
                time.sleep(0.05)

    def is_up(self):
        with self.lock:
            return self.httpd is not None

    def register(self, conn):
        with self.lock:
            self.conns.add(conn)

    def unregister(self, conn):
        with self.lock:
            self.conns.discard(conn)

    def cut_watches(self):
        with self.store.cond:
            watches = list(self.store.watches)
            for w in watches:
                w.cut = True
            self.store.cond.notify_all()
        for w in watches:
            _abort(w.conn)
        return len(watches)

    # -- request handling --

    def handle(self, h, method):
        url = urlsplit(h.path)
        query = parse_qs(url.query, keep_blank_values=True)
        parts = [unquote(p) for p in url.path.split("/") if p]
        try:
            self.route(h, method, parts, query)
        except ApiError as e:
            h.send_json(e.code, e.status())
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            h.close_connection = True
        except Exception as e:  # noqa: BLE001 - report as a Status, keep serving
            log(f"internal error on {method} {h.path}: {e!r}")
            import traceback

            traceback.print_exc()
            h.send_json(500, status_object(500, "InternalError", f"Internal error occurred: {e}"))

    def route(self, h, method, parts, query):
        store = self.store
        # Discovery
        if method == "GET" and self.discovery(h, parts):
            store.count("other")
            return
        # Resource paths: /api/v1/... or /apis/{group}/{version}/...
        if len(parts) >= 3 and parts[0] == "api" and parts[1] == "v1":
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 4 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            store.count("other")
            raise path_not_found()
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        rt = BY_PATH.get((group, version, rest[0]))
        if rt is None or len(rest) > 2 or (namespace is not None and not rt.namespaced):
            store.count("other")
            raise path_not_found()
        name = rest[1] if len(rest) == 2 else None
        if name is not None and rt.namespaced and namespace is None:
            store.count("other")
            raise path_not_found()

        if name is None:
            if method == "GET":
                if qbool(query, "watch"):
                    store.count("watch", rt)
                    return self.watch(h, rt, namespace, query)
                store.count("list", rt)
                return self.list(h, rt, namespace, query)
            store.count("other", rt)
            if method == "POST":
                if rt.namespaced and namespace is None:
                    raise method_not_allowed()
                return self.create(h, rt, namespace)
            raise method_not_allowed()

        store.count("other", rt)
        key = (namespace or "", name)
        if method == "GET":
            with store.cond:
                obj = store.objects[rt].get(key)
            if obj is None:
                raise not_found(rt, name)
            return h.send_json(200, obj)
        if method == "PUT":
            body = self.read_object(h, rt, namespace)
            body.setdefault("metadata", {}).setdefault("name", name)
            stored, created = store.update(rt, key, lambda _existing: body)
            return h.send_json(201 if created else 200, stored)
        if method == "PATCH":
            return self.patch(h, rt, key, query)
        if method == "DELETE":
            h.read_body()
            return h.send_json(200, store.delete(rt, key))
        raise method_not_allowed()

    def discovery(self, h, parts):
        aggregated = "as=APIGroupDiscoveryList" in (h.headers.get("Accept") or "")
        if parts == ["version"]:
            h.send_json(
                200,
                {
                    "major": "1",
                    "minor": "35",
                    "gitVersion": "v1.35.0-fake",
                    "gitCommit": "0000000000000000000000000000000000000000",
                    "gitTreeState": "clean",
                    "buildDate": "2025-01-01T00:00:00Z",
                    "goVersion": "go1.24.0",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                },
            )
            return True
        if parts == ["api"]:
            if aggregated:
                h.send_aggregated(self.aggregated([""]))
            else:
                h.send_json(
                    200,
                    {
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}],
                    },
                )
            return True
        if parts == ["api", "v1"]:
            h.send_json(200, self.resource_list("", "v1"))
            return True
        if parts == ["apis"]:
            if aggregated:
                h.send_aggregated(self.aggregated(GROUPS))
            else:
                h.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [self.api_group(g) for g in GROUPS]})
            return True
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in GROUPS:
            h.send_json(200, dict(self.api_group(parts[1]), kind="APIGroup", apiVersion="v1"))
            return True
        if len(parts) == 3 and parts[0] == "apis" and parts[1] in GROUPS and any(rt.group == parts[1] and rt.version == parts[2] for rt in RESOURCES):
            h.send_json(200, self.resource_list(parts[1], parts[2]))
            return True
        return False

    @staticmethod
    def api_group(group):
        versions = []
        for rt in RESOURCES:
            if rt.group == group and rt.version not in versions:
                versions.append(rt.version)
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": gvs, "preferredVersion": gvs[0]}

    @staticmethod
    def resource_list(group, version):
        resources = []
        for rt in RESOURCES:
            if rt.group == group and rt.version == version:
                r = {
                    "name": rt.plural,
                    "singularName": rt.singular,
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": rt.verbs,
                }
                if rt.short_names:
                    r["shortNames"] = rt.short_names
                resources.append(r)
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    @staticmethod
    def aggregated(groups):
        items = []
        for group in groups:
            versions = []
            for rt in RESOURCES:
                if rt.group != group:
                    continue
                ver = next((v for v in versions if v["version"] == rt.version), None)
                if ver is None:
                    ver = {"version": rt.version, "resources": [], "freshness": "Current"}
                    versions.append(ver)
                r = {
                    "resource": rt.plural,
                    "responseKind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
                    "scope": "Namespaced" if rt.namespaced else "Cluster",
                    "singularResource": rt.singular,
                    "verbs": rt.verbs,
                }
                if rt.short_names:
                    r["shortNames"] = rt.short_names
                ver["resources"].append(r)
            items.append({"metadata": {"name": group, "creationTimestamp": None}, "versions": versions})
        return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items}

    # -- reads --

    def filter_from(self, rt, namespace, query):
        return Filter(
            rt,
            namespace,
            parse_label_selector(qp(query, "labelSelector")),
            parse_field_selector(rt, qp(query, "fieldSelector")),
        )

    def list(self, h, rt, namespace, query):
        store = self.store
        flt = self.filter_from(rt, namespace, query)
        limit_s = qp(query, "limit", "")
        try:
            limit = int(limit_s) if limit_s else 0
        except ValueError:
            raise bad_request(f"invalid limit {limit_s!r}")
        token = qp(query, "continue", "")
        rv_param = qp(query, "resourceVersion", "")
        match = qp(query, "resourceVersionMatch", "")
        if match and not rv_param:
            raise invalid_list_options("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided")
        if match and match not in ("Exact", "NotOlderThan"):
            raise invalid_list_options(f'resourceVersionMatch: Unsupported value: "{match}": supported values: "Exact", "NotOlderThan", ""')
        start_after = None
        with store.cond:
            if token:
                if rv_param:
                    raise bad_request("specifying resource version is not allowed when using continue")
                snap_rv, start_after = decode_continue(token)
                if snap_rv < store.compacted:
                    raise expired(
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter, or use the continue token "
                        "in this response to retrieve the remainder of the results. Continuing with the provided "
                        "token results in an inconsistent list - objects that were created, modified, or deleted "
                        "between the time the first chunk was returned and now may show up in the list."
                    )
            elif rv_param and match == "Exact":
                try:
                    snap_rv = int(rv_param)
                except ValueError:
                    raise bad_request(f"invalid resourceVersion {rv_param!r}")
                if snap_rv < store.compacted:
                    raise expired(f"too old resource version: {snap_rv} ({store.compacted})")
                if snap_rv > store.rv:
                    raise ApiError(
                        504,
                        "Timeout",
                        f"Too large resource version: {snap_rv}, current: {store.rv}",
                        {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1},
                    )
            else:
                # resourceVersion unset, "0" or NotOlderThan: the latest state is always acceptable.
                snap_rv = store.rv
            objs = store.snapshot(rt, snap_rv)
        keys = sorted(k for k, o in objs.items() if flt.matches(o))
        if start_after is not None:
            keys = keys[bisect.bisect_right(keys, start_after) :]
        meta = {"resourceVersion": str(snap_rv)}
        if limit > 0 and len(keys) > limit:
            page = keys[:limit]
            meta["continue"] = encode_continue(snap_rv, page[-1])
            meta["remainingItemCount"] = len(keys) - limit
        else:
            page = keys
        body = {
            "kind": rt.list_kind,
            "apiVersion": rt.api_version,
            "metadata": meta,
            "items": [list_item(objs[k]) for k in page],
        }
        h.send_json(200, body)

    def watch(self, h, rt, namespace, query):
        store = self.store
        flt = self.filter_from(rt, namespace, query)
        rv_param = qp(query, "resourceVersion", "")
        bookmarks = qbool(query, "allowWatchBookmarks")
        send_initial_s = qp(query, "sendInitialEvents")
        send_initial = send_initial_s is not None and send_initial_s.lower() in ("true", "1")
        match = qp(query, "resourceVersionMatch", "")
        if send_initial:
            if not bookmarks:
                raise invalid_list_options("allowWatchBookmarks: Required value: allowWatchBookmarks must be true when sendInitialEvents is set")
            if match != "NotOlderThan":
                raise invalid_list_options("resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan")
        elif match:
            raise invalid_list_options("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided")
        if rv_param not in ("", "0"):
            try:
                start_rv = int(rv_param)
            except ValueError:
                raise bad_request(f"invalid resource version: {rv_param}")
        else:
            start_rv = None
        timeout_s = qp(query, "timeoutSeconds", "")
        try:
            timeout = float(timeout_s) if timeout_s else 1800.0
        except ValueError:
            raise bad_request(f"invalid timeoutSeconds {timeout_s!r}")
        deadline = time.monotonic() + timeout

        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Cache-Control", "no-cache, private")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        w = Watch(h.connection)
        with store.cond:
            store.watches.add(w)
        try:
            self.stream(h, w, rt, flt, start_rv, send_initial, bookmarks, deadline)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError):
            h.close_connection = True
        finally:
            with store.cond:
                store.watches.discard(w)

    def stream(self, h, w, rt, flt, start_rv, send_initial, bookmarks, deadline):
        store = self.store
        write = h.wfile.write

        def chunk(event):
            data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
            return b"%x\r\n%s\r\n" % (len(data), data)

        def bookmark(rv, annotations=None):
            md = {"resourceVersion": str(rv)}
            if annotations:
                md["annotations"] = annotations
            return chunk({"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": md}})

        def end_clean():
            write(b"0\r\n\r\n")

        def abort():
            h.close_connection = True

        # Wait out a pause before deciding where the watch starts.
        with store.cond:
            while store.paused and not w.cut and time.monotonic() < deadline:
                store.cond.wait(max(0.0, deadline - time.monotonic()))
            if w.cut:
                return abort()
            if time.monotonic() >= deadline:
                return end_clean()
            initial = None
            if start_rv is None or send_initial:
                # "Get state and start at most recent": synthetic ADDED events for what exists.
                cursor = store.rv
                if start_rv is not None and start_rv > cursor:
                    cursor = start_rv
                initial = [o for _, o in sorted(store.objects[rt].items()) if flt.matches(o)]
            elif start_rv < store.compacted:
                err = self.too_old(start_rv)
                write(chunk(err))
                return end_clean()
            else:
                cursor = start_rv
        if initial is not None:
            out = [chunk({"type": "ADDED", "object": o}) for o in initial]
            if send_initial:
                out.append(bookmark(cursor, {"k8s.io/initial-events-end": "true"}))
            if out:
                write(b"".join(out))

        next_bookmark = time.monotonic() + self.bookmark_interval
        while True:
            with store.cond:
                while True:
                    if w.cut:
                        return abort()
                    now = time.monotonic()
                    if now >= deadline:
                        action = "end"
                        break
                    if store.paused:
                        store.cond.wait(deadline - now)
                        continue
                    if cursor < store.compacted:
                        # Fell behind a compaction (e.g. while paused), like a watcher the
                        # watch cache cannot serve any more.
                        action, err = "expired", self.too_old(cursor)
                        break
                    events = store.events_after(cursor)
                    if events:
                        action = "events"
                        break
                    if bookmarks and now >= next_bookmark:
                        action = "bookmark"
                        cursor = max(cursor, store.rv)
                        break
                    wake = min(deadline, next_bookmark) if bookmarks else deadline
                    store.cond.wait(max(0.0, wake - now))
            if action == "end":
                return end_clean()
            if action == "expired":
                write(chunk(err))
                return end_clean()
            if action == "bookmark":
                write(bookmark(cursor))
                store.count("bookmarks")
                next_bookmark = time.monotonic() + self.bookmark_interval
                continue
            out = []
            for ev in events:
                cursor = ev.rv
                if ev.rt is not rt:
                    continue
                if ev.type == "ADDED":
                    if flt.matches(ev.obj):
                        out.append(chunk({"type": "ADDED", "object": ev.obj}))
                elif ev.type == "DELETED":
                    if flt.matches(ev.old):
                        out.append(chunk({"type": "DELETED", "object": ev.obj}))
                else:
                    was, now_matches = flt.matches(ev.old), flt.matches(ev.obj)
                    if was and now_matches:
                        out.append(chunk({"type": "MODIFIED", "object": ev.obj}))
                    elif now_matches:
                        out.append(chunk({"type": "ADDED", "object": ev.obj}))
                    elif was:
                        # Stopped matching the selector: the watcher sees it go away, as the
                        # previous state stamped with this event's resourceVersion.
                        out.append(chunk({"type": "DELETED", "object": with_rv(ev.old, ev.rv)}))
            if out:
                write(b"".join(out))

    def too_old(self, rv):
        return {
            "type": "ERROR",
            "object": status_object(410, "Expired", f"too old resource version: {rv} ({self.store.compacted})"),
        }

    # -- writes --

    def read_object(self, h, rt, namespace):
        raw = h.read_body()
        try:
            obj = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the body of the request was in an unknown format: {e}")
        if not isinstance(obj, dict):
            raise bad_request("the body of the request must be a JSON object")
        if obj.get("kind") not in (None, "", rt.kind) or obj.get("apiVersion") not in (None, "", rt.api_version):
            raise bad_request(f"the API version in the data ({obj.get('apiVersion')}) does not match the expected API version ({rt.api_version})")
        md = obj.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise bad_request("metadata must be an object")
        if not rt.namespaced:
            md.pop("namespace", None)
        else:
            if md.get("namespace") and md["namespace"] != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
            md["namespace"] = namespace
        return obj

    def create(self, h, rt, namespace):
        obj = self.read_object(h, rt, namespace)
        md = obj["metadata"]
        if not md.get("name") and not md.get("generateName"):
            raise invalid(rt, "", "metadata.name: Required value: name or generateName is required")
        if md.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        h.send_json(201, self.store.create(rt, obj))

    def patch(self, h, rt, key, query):
        ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip()
        raw = h.read_body()
        try:
            patch = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (JSON only here)")
        apply = ctype == "application/apply-patch+yaml"
        if ctype == "application/json-patch+json":
            fn = lambda existing: json_patch(existing, patch)  # noqa: E731
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json") or apply:
            # Strategic merge is applied as a JSON merge patch (lists replaced, not merged).
            if not isinstance(patch, dict):
                raise bad_request("merge patch must be a JSON object")

            def fn(existing):
                base = existing if existing is not None else {"metadata": {"name": key[1], **({"namespace": key[0]} if rt.namespaced else {})}}
                return merge_patch(base, patch)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml")
        expect = ((patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None) or ""

        def build(existing):
            new = fn(existing)
            if not isinstance(new, dict):
                raise bad_request("patch result is not an object")
            new = dict(new)
            md = dict(new.get("metadata") or {})
            md.pop("resourceVersion", None)
            new["metadata"] = md
            return new

        stored, created = self.store.update(rt, key, build, expect_rv=expect, create_missing=apply)
        h.send_json(201 if created else 200, stored)


def _abort(conn):
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def server_bind(self):
        # HTTPServer.server_bind would resolve the host name; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-apiserver"
    sys_version = ""

    def setup(self):
        super().setup()
        self.server.app.register(self.connection)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.app.unregister(self.connection)

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send_json(self, code, obj, content_type="application/json"):
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.write(body)

    def send_aggregated(self, obj):
        self.send_json(200, obj, "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList")

    def _do(self):
        self.server.app.handle(self, self.command)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _do

    def log_message(self, fmt, *args):
        log(f"api {self.address_string()} {fmt % args}")


# --------------------------------------------------------------------------------------------
# The control server


class ControlHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-apiserver-control"
    sys_version = ""

    def send_json(self, code, obj):
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw or b"null")
        except json.JSONDecodeError as e:
            raise bad_request(f"invalid JSON: {e}")

    def _do(self):
        app = self.server.app
        store = app.store
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
        m = self.command
        try:
            if m == "PUT" and parts == ["objects"]:
                return self.send_json(200, apply_object(store, self.body()))
            if m == "PUT" and parts == ["objects", "bulk"]:
                objs = self.body()
                if not isinstance(objs, list):
                    raise bad_request("expected a JSON array of objects")
                for obj in objs:
                    apply_object(store, obj)
                return self.send_json(200, {"count": len(objs), "resourceVersion": str(store.rv)})
            if m == "GET" and len(parts) == 2 and parts[0] == "objects":
                rt = control_resource(parts[1])
                if rt is None:
                    raise bad_request(f"unknown resource {parts[1]!r}")
                with store.cond:
                    items = [store.objects[rt][k] for k in sorted(store.objects[rt])]
                return self.send_json(200, items)
            if m == "DELETE" and len(parts) == 4 and parts[0] == "objects":
                rt = control_resource(parts[1])
                if rt is None:
                    raise bad_request(f"unknown resource {parts[1]!r}")
                ns = "" if parts[2] == "_" or not rt.namespaced else parts[2]
                return self.send_json(200, store.delete(rt, (ns, parts[3])))
            if m == "POST" and parts == ["cut-watches"]:
                return self.send_json(200, {"cut": app.api.cut_watches()})
            if m == "POST" and parts == ["pause-watches"]:
                with store.cond:
                    store.paused = True
                    store.cond.notify_all()
                return self.send_json(200, {"paused": True})
            if m == "POST" and parts == ["resume-watches"]:
                with store.cond:
                    store.paused = False
                    store.cond.notify_all()
                return self.send_json(200, {"paused": False})
            if m == "POST" and parts == ["compact"]:
                return self.send_json(200, {"compactedResourceVersion": str(store.compact())})
            if m == "POST" and parts == ["down"]:
                return self.send_json(200, {"changed": app.api.down()})
            if m == "POST" and parts == ["up"]:
                return self.send_json(200, {"changed": app.api.up(), "port": app.api.port})
            if m == "GET" and parts == ["stats"]:
                with store.cond:
                    stats = json.loads(json.dumps(store.stats))
                    stats["open_watches"] = len(store.watches)
                    stats["resourceVersion"] = str(store.rv)
                    stats["compactedResourceVersion"] = str(store.compacted)
                    stats["paused"] = store.paused
                stats["up"] = app.api.is_up()
                return self.send_json(200, stats)
            if m == "POST" and parts == ["reset-stats"]:
                with store.cond:
                    store.reset_stats()
                return self.send_json(200, {})
            if m == "GET" and parts == ["events"]:
                with store.cond:
                    items = [o for rt in RESOURCES if rt.kind == "Event" for o in store.objects[rt].values()]
                return self.send_json(200, items)
            if m == "GET" and parts == ["healthz"]:
                return self.send_json(200, {"ok": True})
            raise path_not_found()
        except ApiError as e:
            self.send_json(e.code, e.status())
        except Exception as e:  # noqa: BLE001
            log(f"control error on {m} {self.path}: {e!r}")
            self.send_json(500, status_object(500, "InternalError", str(e)))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _do

    def log_message(self, fmt, *args):
        log(f"control {fmt % args}")


def apply_object(store, obj):
    if not isinstance(obj, dict):
        raise bad_request("expected an object")
    rt = BY_KIND.get((obj.get("apiVersion"), obj.get("kind")))
    if rt is None:
        raise bad_request(f"unsupported apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')}")
    md = obj.get("metadata")
    if not isinstance(md, dict) or not md.get("name"):
        raise bad_request("metadata.name is required")
    obj = dict(obj)
    md = dict(md)
    if rt.namespaced:
        md.setdefault("namespace", "default")
    else:
        md.pop("namespace", None)
    obj["metadata"] = md
    return store.put(rt, obj)


class App:
    def __init__(self, bookmark_interval):
        self.store = Store()
        self.api = ApiApp(self.store, bookmark_interval)


def write_atomically(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    global LOG_QUIET
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", required=True)
    p.add_argument("--control-port-file", required=True)
    p.add_argument("--bookmark-interval", type=float, default=1.0)
    p.add_argument("--exit-on-stdin-eof", action="store_true", help="exit when stdin closes (the parent died)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    LOG_QUIET = args.quiet

    app = App(args.bookmark_interval)
    port = app.api.start(args.port)
    control = Server(("127.0.0.1", 0), ControlHandler)
    control.app = app
    threading.Thread(target=control.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    write_atomically(args.control_port_file, f"{control.server_address[1]}\n")
    write_atomically(args.port_file, f"{port}\n")
    log(f"fake apiserver on 127.0.0.1:{port}, control on 127.0.0.1:{control.server_address[1]}")

    if args.exit_on_stdin_eof:
        while sys.stdin.buffer.read(4096):
            pass
        log("stdin closed, exiting")
        os._exit(0)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
