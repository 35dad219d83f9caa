"""OpenNebula template handling for the simulator: parse (XML or ``K = V`` syntax), merge, render.

A template is a dict whose values are strings, nested dicts (vector attributes such as
``CONTEXT=[...]``) or lists of those (a repeated attribute such as several ``NIC``).
"""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from typing import Any
from xml.sax.saxutils import escape

Template = dict[str, Any]

# attributes oned moves from the submitted template into TEMPLATE; everything else is USER_TEMPLATE
WELL_KNOWN = frozenset(
    {
        "CPU", "VCPU", "MEMORY", "DISK", "NIC", "NIC_ALIAS", "CONTEXT", "OS", "GRAPHICS", "VIDEO", "INPUT",
        "RAW", "FEATURES", "CPU_MODEL", "PCI", "TPM", "TOPOLOGY", "NUMA_NODE", "EMULATOR", "MEMORY_MAX",
        "VCPU_MAX", "VMID", "TEMPLATE_ID", "SCHED_ACTION",
    }
)  # fmt: skip
# the USER_TEMPLATE subset a short (vmpool.info) body carries
SHORT_USER_KEYS = (
    "LABELS", "ERROR", "SCHED_MESSAGE", "SCHED_RANK", "SCHED_DS_RANK", "SCHED_REQUIREMENTS",
    "SCHED_DS_REQUIREMENTS", "USER_PRIORITY", "SCHED_ACTION",
)  # fmt: skip


class TemplateSyntaxError(ValueError):
    pass


def _add(target: Template, key: str, value: Any) -> None:
    if key in target:
        existing = target[key]
        if isinstance(existing, list):
            existing.append(value)
        else:
            target[key] = [existing, value]
    else:
        target[key] = value


def _element(elem: ET.Element) -> Any:
    if len(elem):
        out: Template = {}
        for child in elem:
            _add(out, child.tag.upper(), _element(child))
        return out
    return elem.text or ""


def parse_xml(text: str) -> Template:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise TemplateSyntaxError(f"syntax error in XML template: {exc}") from None
    value = _element(root)
    return value if isinstance(value, dict) else {}


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>\#[^\n]*)
      | (?P<name>[A-Za-z_][A-Za-z0-9_.-]*)
      | (?P<quoted>"(?:[^"\\]|\\.)*")
      | (?P<punct>[=\[\],])
      | (?P<newline>\n)
      | (?P<bare>[^\s=\[\],"]+)
    )""",
    re.VERBOSE,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos] in " \t\r":
            pos += 1
            continue
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise TemplateSyntaxError(f"syntax error in template near {text[pos : pos + 20]!r}")
        pos = match.end()
        kind = match.lastgroup or ""
        if kind == "comment":
            continue
        value = match.group(kind)
        if kind == "quoted":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out.append((kind, value))
    return out


def parse_one(text: str) -> Template:
    """OpenNebula's ``KEY = VALUE`` / ``KEY = [ A = "x", B = y ]`` syntax."""
    tokens = [t for t in _tokens(text)]
    out: Template = {}
    i = 0

    def value_at(j: int) -> tuple[str, int]:
        if j < len(tokens) and tokens[j][0] in ("quoted", "bare", "name"):
            return tokens[j][1], j + 1
        return "", j

    while i < len(tokens):
        kind, value = tokens[i]
        if kind in ("newline",) or (kind == "punct" and value == ","):
            i += 1
            continue
        if kind != "name":
            raise TemplateSyntaxError(f"syntax error in template: unexpected {value!r}")
        key = value.upper()
        if i + 1 >= len(tokens) or tokens[i + 1] != ("punct", "="):
            raise TemplateSyntaxError(f"syntax error in template: {key} without '='")
        i += 2
        while i < len(tokens) and tokens[i][0] == "newline":
            i += 1
        if i < len(tokens) and tokens[i] == ("punct", "["):
            i += 1
            vector: dict[str, str] = {}
            while i < len(tokens) and tokens[i] != ("punct", "]"):
                k2, v2 = tokens[i]
                if k2 == "newline" or (k2 == "punct" and v2 == ","):
                    i += 1
                    continue
                if k2 != "name" or i + 1 >= len(tokens) or tokens[i + 1] != ("punct", "="):
                    raise TemplateSyntaxError(f"syntax error in vector attribute {key}")
                val, i = value_at(i + 2)
                vector[v2.upper()] = val
            if i >= len(tokens):
                raise TemplateSyntaxError(f"syntax error: unterminated vector attribute {key}")
            i += 1
            _add(out, key, vector)
        else:
            val, i = value_at(i)
            _add(out, key, val)
    return out


def parse(text: str) -> Template:
    stripped = text.lstrip()
    if not stripped:
        return {}
    if stripped.startswith("<"):
        value = parse_xml(stripped)
        return value
    return parse_one(text)


def merge_top(base: Template, extra: Template) -> Template:
    """``template.instantiate`` semantics: attributes in ``extra`` overwrite whole attributes of ``base``."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = copy.deepcopy(value)
    return out


def split(template: Template) -> tuple[Template, Template]:
    """(TEMPLATE, USER_TEMPLATE) the way oned splits a submitted template."""
    tmpl: Template = {}
    user: Template = {}
    for key, value in template.items():
        (tmpl if key in WELL_KNOWN else user)[key] = value
    return tmpl, user


def _cdata(value: str) -> str:
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def render(tag: str, value: Any) -> str:
    """XML for one attribute (values in CDATA, as oned emits them)."""
    if isinstance(value, list):
        return "".join(render(tag, item) for item in value)
    if isinstance(value, dict):
        return f"<{tag}>" + "".join(render(k, v) for k, v in value.items()) + f"</{tag}>"
    return f"<{tag}>{_cdata(str(value))}</{tag}>"


def render_body(tag: str, template: Template) -> str:
    if not template:
        return f"<{tag}/>"
    return render(tag, template)


def text(value: Any) -> str:
    """Escape plain element text."""
    return escape(str(value))
