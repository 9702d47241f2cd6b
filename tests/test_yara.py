"""YARA engine: namespaces per file, externals per part, compile errors, subsets, meta."""

import hashlib
import pickle

import pytest

import rescan.engines.yara as yara_engine
from rescan.definitions import Definitions
from rescan.engines.yara import YaraSpec, filetype_of, find_rule_files, fingerprint_rule_file
from rescan.errors import DefinitionsError
from rescan.models import Limits, Part

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def part(data, path="1/file.bin", filename="file.bin"):
    return Part(path, "application/octet-stream", filename, len(data), hashlib.sha256(data).hexdigest(), data)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RESCAN_CACHE_DIR", str(tmp_path / "cache"))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_each_file_is_a_namespace_named_by_relative_path(tmp_path):
    write(tmp_path / "r/a.yar", 'rule A { strings: $a = "alpha" condition: $a }')
    write(tmp_path / "r/sub/b.yara", 'rule B { meta: author = "x" strings: $b = "beta" condition: $b }')
    write(tmp_path / "r/.hidden/c.yar", 'rule C { strings: $c = "gamma" condition: $c }')
    spec = YaraSpec([tmp_path / "r"])
    assert list(spec.components()) == [".hidden/c.yar", "a.yar", "sub/b.yara"]
    f, p = spec.load().scan_part(part(b"xx alpha beta gamma"))
    assert p == []
    assert {(x.rule, x.namespace) for x in f} == {("A", "a.yar"), ("B", "sub/b.yara"), ("C", ".hidden/c.yar")}
    assert [x.meta for x in f if x.rule == "B"] == [{"author": "x"}]


def test_externals_are_set_per_part(tmp_path):
    write(tmp_path / "ext.yar", """
rule ByName { condition: filename == "invoice.pdf.exe" and extension == "exe" }
rule ByPath { condition: filepath == "2/invoice.pdf.exe" }
rule ByType { condition: filetype == "EXE" }
""")
    eng = YaraSpec([tmp_path / "ext.yar"]).load()
    f, _ = eng.scan_part(part(b"MZ\x90\x00", "2/invoice.pdf.exe", "invoice.pdf.exe"))
    assert {x.rule for x in f} == {"ByName", "ByPath", "ByType"}
    f, _ = eng.scan_part(part(b"hello", "3/notes.txt", "notes.txt"))
    assert f == []


def test_compile_error_names_file_and_line(tmp_path):
    write(tmp_path / "r/good.yar", "rule G { condition: true }")
    write(tmp_path / "r/bad.yar", "rule Ok { condition: true }\nrule Broken { condition: nosuchthing }\n")
    with pytest.raises(DefinitionsError) as exc:
        YaraSpec([tmp_path / "r"])
    assert "bad.yar(2)" in str(exc.value)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(DefinitionsError, match="not found"):
        find_rule_files([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DefinitionsError, match="no .yar"):
        find_rule_files([tmp_path / "empty"])


def test_fingerprint_follows_includes(tmp_path):
    inc = write(tmp_path / "common.yar", 'rule Common { strings: $a = "one" condition: $a }')
    main = write(tmp_path / "main.yar", 'include "common.yar"\nrule M { condition: Common }')
    before = fingerprint_rule_file(main)
    inc.write_text('rule Common { strings: $a = "two" condition: $a }')
    assert fingerprint_rule_file(main) != before


def test_remembered_fingerprints_follow_changed_rule_files_and_includes(tmp_path):
    inc = write(tmp_path / "inc/common.yar", 'rule Common { strings: $a = "one" condition: $a }')
    write(tmp_path / "r/main.yar", 'include "../inc/common.yar"\nrule M { condition: Common }')
    write(tmp_path / "r/plain.yar", 'rule P { strings: $a = "the include word" condition: $a }')
    first = YaraSpec([tmp_path / "r"])
    assert first.rule_counts() == {"main.yar": 1, "plain.yar": 1}
    assert YaraSpec([tmp_path / "r"]).components() == first.components()  # remembered

    inc.write_text('rule Common { strings: $a = "two!" condition: $a }')  # another size
    second = YaraSpec([tmp_path / "r"]).components()
    assert second["main.yar"] != first.components()["main.yar"]
    assert second["plain.yar"] == first.components()["plain.yar"]
    assert second["main.yar"] == fingerprint_rule_file(tmp_path / "r/main.yar")

    inc.unlink()  # what a remembered fingerprint rested on is gone: a clear error
    with pytest.raises(DefinitionsError, match="common.yar"):
        YaraSpec([tmp_path / "r"])


def test_subset_scans_only_those_components(tmp_path):
    write(tmp_path / "r/a.yar", 'rule A { strings: $a = "alpha" condition: $a }')
    write(tmp_path / "r/b.yar", 'rule B { strings: $b = "alpha" condition: $b }')
    eng = YaraSpec([tmp_path / "r"]).load()
    f, _ = eng.scan_part(part(b"alpha"), ["b.yar"])
    assert [x.rule for x in f] == ["B"]
    assert eng.scan_part(part(b"alpha"), []) == ([], [])


def test_spec_pickles_and_compiled_rules_are_reused(tmp_path):
    write(tmp_path / "r/a.yar", 'rule A { strings: $a = "alpha" condition: $a }')
    spec = YaraSpec([tmp_path / "r"])
    again = pickle.loads(pickle.dumps(spec))
    assert again.layers == YaraSpec([tmp_path / "r"]).layers
    assert [x.rule for x in again.load().scan_part(part(b"alpha"))[0]] == ["A"]


def many_rule_files(root, n=20):
    for i in range(n):
        write(root / f"f{i:02d}.yar", f'rule R{i:02d} {{ strings: $a = "alpha" condition: $a }}\n'
                                      f'rule S{i:02d} {{ strings: $b = "beta" condition: $b }}')


def rules_found(spec, data=b"alpha beta"):
    return [(f.namespace, f.rule) for f in spec.load().scan_part(part(data))[0]]


def test_a_few_changed_rule_files_are_compiled_alone_on_top_of_the_earlier_set(tmp_path, monkeypatch):
    root = tmp_path / "r"
    many_rule_files(root)
    first = YaraSpec([root])
    assert len(first.layers) == 1 and first.layers[0][1] is None

    write(root / "a-new.yar", 'rule New { strings: $a = "beta" condition: $a }')
    write(root / "f03.yar", 'rule Changed { strings: $a = "beta" condition: $a }')
    (root / "f07.yar").unlink()
    spec = YaraSpec([root])
    (base, keep), (added, whole) = spec.layers
    assert base == first.layers[0][0] and whole is None
    assert set(keep) == {f"f{i:02d}.yar" for i in range(20)} - {"f03.yar", "f07.yar"}

    found = rules_found(spec)
    assert ("f03.yar", "R03") not in found and ("f03.yar", "Changed") in found  # the new f03 only
    assert not any(ns == "f07.yar" for ns, _ in found)  # removed: nothing from it
    assert ("a-new.yar", "New") in found
    alpha = rules_found(spec, b"alpha")
    # The next run finds the same layers without compiling anything.
    monkeypatch.setattr(yara_engine, "compile_rules", lambda files: pytest.fail("compiled again"))
    again = YaraSpec([root])
    assert again.layers == spec.layers and rules_found(again) == found
    monkeypatch.undo()
    # The same findings, in the same order, as the whole set compiled in one piece.
    for cached in (tmp_path / "cache").rglob("*.yarc"):
        cached.unlink()
    fresh = YaraSpec([root])
    assert len(fresh.layers) == 1 and rules_found(fresh) == found
    assert rules_found(fresh, b"alpha") == alpha


def test_a_broken_added_file_fails_before_any_mail_and_many_changes_compile_whole(tmp_path):
    root = tmp_path / "r"
    many_rule_files(root)
    YaraSpec([root])
    write(root / "bad.yar", "rule Bad {\n condition: nope }")
    with pytest.raises(DefinitionsError, match=r"bad\.yar\(2\)"):
        YaraSpec([root])
    (root / "bad.yar").unlink()
    for i in range(5):  # a quarter of the files: compiled whole again
        write(root / f"f{i:02d}.yar", f'rule T{i:02d} {{ strings: $a = "alpha" condition: $a }}')
    spec = YaraSpec([root])
    assert len(spec.layers) == 1 and spec.layers[0][1] is None
    assert ("f00.yar", "T00") in rules_found(spec) and ("f19.yar", "R19") in rules_found(spec)


def test_bundled_rules_find_eicar():
    spec = YaraSpec([Definitions.build().specs[0].files["eicar.yar"]])
    f, _ = spec.load().scan_part(part(EICAR))
    assert [x.rule for x in f] == ["EICAR_Test_File"]


def test_filetype_of():
    assert filetype_of(b"MZ...") == "EXE"
    assert filetype_of(b"\x7fELF") == "ELF"
    assert filetype_of(b"plain") == ""


def test_definitions_version_changes_with_rules_and_limits(tmp_path):
    write(tmp_path / "r/a.yar", 'rule A { condition: true }')
    d1 = Definitions.build([tmp_path / "r"])
    d2 = Definitions.build([tmp_path / "r"], limits=Limits(max_files=5))
    assert d1.version != d2.version
    prev = d1.components()
    write(tmp_path / "r/b.yar", 'rule B { condition: true }')
    (tmp_path / "r/a.yar").write_text('rule A2 { condition: true }')
    d3 = Definitions.build([tmp_path / "r"])
    assert d3.changes_since(prev) == {"added": ["b.yar"], "changed": ["a.yar"], "removed": []}
    assert d3.to_json(prev)["changed_since_last_run"]["added"] == ["b.yar"]
