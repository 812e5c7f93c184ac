"""Malformed manifest files, one per way a file can be wrong (shared by the unit and real-process
tests): name -> (file name, bytes, a phrase the error must contain)."""

from __future__ import annotations


def _bomb() -> bytes:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        uses = ",".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{uses}]")
    return ("\n".join(lines) + "\n").encode()


_SERVICE = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n"

BAD_FILES: dict[str, tuple[str, bytes, str]] = {
    "huge integer": (
        "huge.yaml",
        (_SERVICE + "  ports: [{port: " + "1" * 4300 + "}]\n").encode(),
        "integer too large",
    ),
    "huge integer json": ("huge.json", b'{"kind": ' + b"7" * 5000 + b"}", "integer"),
    "impossible date": ("date.yaml", (_SERVICE + "  stamp: 2001-13-01\n").encode(), "month"),
    "impossible time": (
        "time.yaml",
        (_SERVICE + "  stamp: 1999-12-31 25:00:00\n").encode(),
        "hour",
    ),
    "bad bool tag": ("bool.yaml", (_SERVICE + "  x: !!bool maybe\n").encode(), "'maybe'"),
    "bad float tag": ("float.yaml", (_SERVICE + "  x: !!float abc\n").encode(), "'abc'"),
    "bad verbatim int tag": (
        "int.yaml",
        (_SERVICE + "  x: !<tag:yaml.org,2002:int> 12a\n").encode(),
        "'12a'",
    ),
    "deep json": ("deep.json", b"[" * 1500 + b"]" * 1500, "nested deeper than 64"),
    "deep yaml": ("deep.yaml", b"a: " + b"[" * 999 + b"]" * 999, "nested deeper than 64"),
    "deeper than libyaml": ("deeper.yaml", b"[" * 20000, "nesting depth"),
    "binary": ("binary.yaml", bytes(range(256)) * 8, "binary file"),
    "utf-16": ("utf16.yaml", _SERVICE.encode("utf-16"), "UTF-16"),
    "latin-1": ("latin1.yaml", "kind: Sérvice\n".encode("latin-1"), "not UTF-8"),
    "alias bomb": ("bomb.yaml", _bomb(), "alias"),
    "too large": ("large.yaml", b"# " + b"x" * (10 * 1024 * 1024) + b"\n", "10 MiB"),
}
