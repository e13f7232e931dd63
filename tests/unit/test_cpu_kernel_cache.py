"""Where the CPU kernels' build is cached (backends/cpu/kernels.py)."""

from __future__ import annotations

from tessera.backends.cpu import kernels


def test_each_checkout_has_its_own_build_directory(tmp_path, monkeypatch) -> None:
    # torch's builder records the source paths and rebuilds when they change, so two checkouts of
    # the same sources sharing a directory would rebuild it each time the other one loads
    monkeypatch.setenv("TESSERA_KERNEL_CACHE", str(tmp_path / "cache"))
    directories = []
    for checkout in ("a", "b"):
        folder = tmp_path / checkout
        folder.mkdir()
        for source in kernels.SOURCES:
            (folder / source.name).write_bytes(source.read_bytes())
        monkeypatch.setattr(kernels, "SOURCES", [folder / source.name for source in kernels.SOURCES])
        directories.append(kernels._build_dir())
        assert kernels._build_dir() == directories[-1]  # the same for the same checkout
    assert directories[0] != directories[1]
    assert all(d.parent == tmp_path / "cache" for d in directories)
    (tmp_path / "b" / "bindings.cpp").write_bytes(b"// changed\n")
    assert kernels._build_dir() != directories[1]  # and a changed source rebuilds
