"""The committed stubs under server/gen/ are exactly what server/gen_protos.py generates from protos/."""

from adalora.server import gen_protos


def test_committed_stubs_are_not_stale(tmp_path):
    written = gen_protos.generate(tmp_path)
    assert written, "gen_protos wrote nothing: is protos/adalora/v1/adalora.proto there?"
    stale = [str(p) for p in written if (tmp_path / p).read_bytes() != (gen_protos.ROOT / p).read_bytes()]
    assert not stale, f"stale stubs {stale}: run `python -m adalora.server.gen_protos` and commit server/gen/"
    committed = {p.relative_to(gen_protos.ROOT) for p in (gen_protos.ROOT / gen_protos.PACKAGE).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert committed == set(written), f"files in server/gen/ that no proto generates: {committed - set(written)}"


def test_every_rpc_and_field_has_a_comment():
    """The proto documents itself: a // comment line right above every rpc, message field and enum value."""
    for proto in gen_protos.proto_files():
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.strip()
            declares = code.startswith("rpc ") or (code.endswith(";") and "=" in code and not code.startswith(
                ("syntax", "package", "option", "//")))
            if declares:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} has no comment: {code}"
