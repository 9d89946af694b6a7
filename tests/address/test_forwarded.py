"""RFC 7239 ``Forwarded``: the strict grammar, and what a client can and cannot do with it.

The threat: a trusted proxy appends ``, for=<the real client>`` to whatever
the client sent. Whatever the client writes, the gateway must judge the
address the proxy appended, or refuse the field as unreadable (``invalid``);
it must never judge an address the client chose.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import forwarded
from gateway.cidrs import CidrSet
from gateway.clientip import INVALID, MISSING, PUBLIC, ClientIPConfig, resolve

GB, CN = "2.125.160.216", "175.16.199.1"
V4 = ipaddress.IPv4Address
CFG = ClientIPConfig(CidrSet(["127.0.0.0/8", "10.0.0.0/8"]), "forwarded")


def judge(*lines: str | bytes):  # type: ignore[no-untyped-def]
    headers = [(b"forwarded", v if isinstance(v, bytes) else v.encode("latin-1")) for v in lines]
    return resolve("127.0.0.1", headers, CFG)


def appended(client_text: str) -> str:
    """What a proxy that appends to the existing field sends (nginx: "$http_forwarded, for=$remote_addr")."""
    return f"{client_text}, for={CN}"


# --- the reproduction and its neighbours ------------------------------------------------


@pytest.mark.parametrize(
    "client_text",
    [
        f'for={GB};x="',  # the issue: an unterminated quoted-string swallows the proxy's element
        f'for={GB};x="\\',  # a trailing backslash inside quotes
        f'for={GB};x="\\"',  # an escaped quote is not a closing one
        f'for={GB};x="abc\\',
        f'for="{GB}',  # unterminated in the for value itself
        f"for={GB};x",  # a name with no '=': the ',' that follows is not a value
        f"for={GB};x=",  # a '=' with no value
        f"for={GB};for",
        f"for={GB} x=1",  # junk after a value
        f"for={GB};for={GB}",  # a parameter twice in one element
        f"for={GB};FOR={GB}",  # names are case-insensitive, so this is twice too
        f'for={GB};x="a"b',  # text glued to a quoted-string
        f"for={GB};x=a\x00",  # control character
        f'for={GB};x="a\x01"',  # control character inside quotes
        f"for={GB};x=caf\xe9",  # non-ASCII outside quotes
        f"for = {GB}",  # whitespace around '=' is not in the grammar
        f"for=[{GB}]",  # brackets are not token characters
        "for=2001:db8::1",  # IPv6 must be quoted and bracketed
        'for="2001:db8::1"',  # ... bracketed
        'for="[fe80::1%eth0]"',  # zone ids are not part of a node name
        f'for="{GB}:123456"',  # a port has at most five digits
        f'for="{GB}:"',
        'for=""',
        "for=1.2.3",
        "for=256.1.1.1",
        f"by=not-a-node;for={GB}",
        f"for={GB};proto=1http",
        f"for={GB};host=a b",
        f'for={GB};"x"=1',
        f"for={GB};=1",
    ],
)
def test_a_client_cannot_make_the_gateway_judge_its_own_choice(client_text: str) -> None:
    c = judge(appended(client_text))
    assert c.kind == INVALID and c.ip is None and c.problem, c


@pytest.mark.parametrize(
    "client_text",
    [
        f"for={GB}",
        f"for={GB};proto=https",
        f'for={GB};x="a,b;c=d"',  # separators inside quotes are text
        f'for={GB};x="a\\"b"',  # an escaped quote inside quotes
        f'for={GB};x="caf\xe9"',  # obs-text is allowed inside quotes
        f"for={GB},",  # an empty list element
        f"for={GB}, , ,",
        f"for={GB};",  # an empty pair
        f"for={GB} ; proto=http",  # whitespace around ';'
        "for=unknown",
        "for=_hidden",
        'for="_hidden:_port"',
        'for="[2001:db8:cafe::17]:4711";by=_proxy;host="example.com:8080"',
        "",  # nothing: the proxy's ", for=..." starts with an empty element
    ],
)
def test_well_formed_client_text_still_leaves_the_appended_address(client_text: str) -> None:
    c = judge(appended(client_text))
    assert (c.ip, c.kind) == (V4(CN), PUBLIC), c


def test_lines_are_parsed_one_by_one_and_joined() -> None:
    assert judge(f"for={GB}", f"for={CN}").ip == V4(CN)
    # A quote cannot run from one line into the next.
    c = judge(f'for={GB};x="', f'for={CN}"')
    assert c.kind == INVALID and "line 1" in (c.problem or "")
    assert judge(f"for={GB}", "", f"for={CN}").ip == V4(CN)  # an empty line adds nothing


def test_trusted_hops_are_skipped_and_ports_and_ipv6_forms_read() -> None:
    assert judge(f'for="{GB}:4711", for=10.1.2.3;proto=https, for="[::ffff:127.0.0.1]"').ip == V4(GB)
    assert judge('for="[2001:250::1]:443"').ip == ipaddress.ip_address("2001:250::1")
    assert judge('for="[2002:af10:c701::1]"').ip == V4(CN)  # 6to4 is normalised like any hop
    assert judge('FOR="' + GB + '"').ip == V4(GB)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("for=unknown", "unknown"),
        ('for="unknown:80"', "unknown"),
        ("for=_hidden", "obfuscated"),
        ("proto=https", "without for="),
        (";", "without for="),
        ('for="[ff02::1]"', "unicast"),
    ],
)
def test_well_formed_but_no_address_where_the_client_should_be_is_invalid(value: str, problem: str) -> None:
    c = judge(value)
    assert c.kind == INVALID and problem in (c.problem or "")


@pytest.mark.parametrize("lines", [[""], [" "], ["", ","], [" , ,"], ["for=10.0.0.1, for=127.0.0.1"]])
def test_no_client_in_the_field_is_missing(lines: list[str]) -> None:
    c = judge(*lines)
    assert c.kind == MISSING and c.ip is not None and c.ip in CFG.trusted


def test_a_bad_element_left_of_the_client_still_spoils_the_whole_field() -> None:
    # Strict: anything that does not parse makes the field unreadable, wherever it is.
    assert judge(f"for=2001:db8::1, for={GB}").kind == INVALID
    assert judge(f"for={GB};for={GB}, for={CN}").kind == INVALID


def test_elements_unquote_and_lower_case_names() -> None:
    assert forwarded.elements(['For="a\\\\b\\"c";PROTO=http, ;, by=_x']) == [
        {"for": 'a\\b"c', "proto": "http"},
        {},
        {"by": "_x"},
    ]


# --- properties ---------------------------------------------------------------------------------

# Characters that matter to the grammar, and some that must never be accepted outside quotes.
_GRAMMAR_CHARS = [*'for=;,"\\ \t_[]:.-1234567890abcdefxyFOR', "\x00", "\x7f", "\xe9", "\x0b", "\r"]
client_texts = st.text(alphabet=st.sampled_from(_GRAMMAR_CHARS), max_size=40) | st.text(max_size=40)


@given(client_texts)
@settings(max_examples=1500)
def test_property_appending_a_proxy_element_gives_its_address_or_invalid(client_text: str) -> None:
    for lines in ([appended(client_text)], [client_text, f"for={CN}"]):
        c = judge(*(line.encode("utf-8") for line in lines))
        assert c.kind == INVALID or c.ip == V4(CN), (lines, c)


tokens = st.text(alphabet=st.sampled_from(list("!#$%&'*+-.^_`|~09azAZ")), min_size=1, max_size=8)
qdtext = st.text(alphabet=st.sampled_from([chr(c) for c in (9, 32, 0x21, *range(0x23, 0x7F), 0xE9, 0xFF)]), max_size=12)


@st.composite
def nodes(draw: st.DrawFn) -> tuple[str, str]:
    """(text as written in the field, the same node unquoted)."""
    kind = draw(st.sampled_from(["v4", "v6", "unknown", "obf"]))
    if kind == "v4":
        name = str(V4(draw(st.integers(0, 2**32 - 1))))
    elif kind == "v6":
        name = f"[{ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))}]"
    elif kind == "unknown":
        name = draw(st.sampled_from(["unknown", "UNKNOWN", "Unknown"]))
    else:
        name = "_" + draw(st.text(alphabet=st.sampled_from(list("aZ09._-")), min_size=1, max_size=6))
    port = draw(st.none() | st.integers(0, 99999).map(str) | st.just("_p1"))
    node = name if port is None else f"{name}:{port}"
    if node.replace(".", "").replace("_", "").replace("-", "").isalnum() and draw(st.booleans()):
        return node, node  # a token needs no quotes
    return '"' + node + '"', node


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def fields(draw: st.DrawFn) -> tuple[str, list[dict[str, str]]]:
    """A well-formed field with random quoting and whitespace, and what it means."""
    meaning: list[dict[str, str]] = []
    written: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        pairs: dict[str, str] = {}
        parts: list[str] = []
        names = draw(st.lists(st.sampled_from(["for", "by", "proto", "ext", "x-y"]), unique=True, max_size=4))
        for name in names:
            if name in ("for", "by"):
                text, value = draw(nodes())
            elif name == "proto":
                value = draw(st.sampled_from(["http", "https", "h2c+x"]))
                text = draw(st.sampled_from([value, quote(value)]))
            else:
                value = draw(tokens | qdtext)
                is_token = forwarded._TOKEN.fullmatch(value) is not None
                text = value if is_token and draw(st.booleans()) else quote(value)
            pairs[name] = value
            parts.append(f"{draw(st.sampled_from([name, name.upper()]))}={text}")
        sep = draw(st.sampled_from([";", " ; ", ";\t"]))
        written.append(sep.join(parts))
        if pairs:
            meaning.append(pairs)
    return draw(st.sampled_from([",", ", ", " ,\t"])).join(written), meaning


@given(fields())
@settings(max_examples=500)
def test_property_well_formed_fields_parse_to_what_they_say(case: tuple[str, list[dict[str, str]]]) -> None:
    text, meaning = case
    assert forwarded.elements([text]) == meaning
    for element in meaning:
        forwarded.check(element)  # every generated value is valid for its parameter


@given(fields(), st.integers(0, 200), st.sampled_from(['"', "\\", "\x00", "\n", "=", "[", "\xff"]))
def test_property_one_stray_character_never_shifts_a_reading(
    case: tuple[str, list[dict[str, str]]], at: int, ch: str
) -> None:
    """Inserted anywhere in the client's part, a stray character gives an error or a reading that
    still ends with the proxy's element; it can never pull that element into a value."""
    text, _ = case
    at %= len(text) + 1
    broken = text[:at] + ch + text[at:]
    try:
        parsed = forwarded.elements([broken + f", for={CN}"])
    except forwarded.ForwardedError:
        return
    assert parsed[-1] == {"for": CN}
