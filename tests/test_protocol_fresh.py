"""The committed protocol code must be exactly what `make proto` generates from proto/."""

from heterorl import protogen


def test_generated_code_matches_proto(tmp_path):
    written = protogen.generate(tmp_path)
    assert written, "protoc wrote nothing"
    committed = protogen.REPO_ROOT / "heterorl" / "v1"
    for path in written:
        ours = committed / path.name
        assert ours.exists(), f"{path.name} is generated but not committed: run `make proto`"
        assert ours.read_bytes() == path.read_bytes(), f"heterorl/v1/{path.name} is stale: run `make proto`"
    generated = {p.name for p in written}
    stray = {p.name for p in committed.glob("*_pb2*.py*")} - generated
    assert not stray, f"generated files with no .proto behind them: {sorted(stray)}"
