"""Extraction: MIME decoding, containers by content, passwords, limits, bombs, robustness."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import zipfile

import pytest

from rescan.extract import extract, split_headers
from rescan.models import Limits
from tests.extract_fixtures import (
    EICAR, aes_zip_of, bz2_of, gzip_bomb, gzip_of, message, outlook_msg, raw_zip, sevenzip_of,
    tar_of, tnef_of, xz_of, zeros_deflate, zip_bomb, zip_of, zipcrypto_zip,
)

ROOT = Path(__file__).resolve().parent.parent


def run(raw: bytes, limits: Limits = Limits(), passwords=("infected",)):
    x = extract(raw, limits, passwords)
    parts = list(x)
    return x, {p.path: p for p in parts}


def eicar_paths(parts: dict) -> list[str]:
    return sorted(path for path, p in parts.items() if p.data == EICAR)


# --- MIME -----------------------------------------------------------------------------------


def test_headers_sections_and_part_fields():
    raw = message("body text\n", (b"\x00\x01binary", "application/octet-stream", "a.bin"),
                  subject="=?utf-8?q?R=C3=A9sum=C3=A9?= now", message_id=" <id@x> ")
    x, parts = run(raw)
    assert list(parts) == ["headers", "1", "2/a.bin"]
    assert parts["headers"].data == split_headers(raw)[0]
    assert parts["headers"].data.endswith(b"\n") and b"Subject:" in parts["headers"].data
    leaf = parts["2/a.bin"]
    assert leaf.data == b"\x00\x01binary"
    assert leaf.size == len(leaf.data) and leaf.sha256 == hashlib.sha256(leaf.data).hexdigest()
    assert leaf.content_type == "application/octet-stream" and leaf.filename == "a.bin"
    assert x.subject == "Résumé now" and x.message_id == "<id@x>"
    assert x.problems == []


def test_nested_multipart_sections():
    raw = (b"From: a@x\r\nSubject: s\r\nContent-Type: multipart/mixed; boundary=O\r\n\r\n"
           b"--O\r\nContent-Type: multipart/alternative; boundary=I\r\n\r\n"
           b"--I\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
           b"--I\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--I--\r\n"
           b"--O\r\nContent-Type: application/pdf; name=\"x.pdf\"\r\n\r\n%PDF-1\r\n--O--\r\n")
    x, parts = run(raw)
    assert list(parts) == ["headers", "1.1", "1.2", "2/x.pdf"]
    assert parts["1.2"].content_type == "text/html"
    assert x.problems == []


def test_single_part_message_is_section_1():
    x, parts = run(b"From: a@x\nSubject: s\n\nhello\n")
    assert list(parts) == ["headers", "1"] and parts["1"].data == b"hello\n"


def test_quoted_printable_and_base64_leaves():
    raw = (b"From: a@x\nContent-Type: multipart/mixed; boundary=B\n\n"
           b"--B\nContent-Type: text/plain\nContent-Transfer-Encoding: quoted-printable\n\n"
           b"caf=C3=A9 soft=\nbreak\n"
           b"--B\nContent-Type: application/octet-stream; name=e.com\n"
           b"Content-Transfer-Encoding: base64\n\n"
           + base64.encodebytes(EICAR) + b"--B--\n")
    x, parts = run(raw)
    assert parts["1"].data == "café softbreak".encode()  # the last line break belongs to the boundary
    assert parts["2/e.com"].data == EICAR
    assert x.problems == []


def test_uuencode_transfer_encoding_and_block_in_text_body():
    import binascii

    uu = b"".join(binascii.b2a_uu(EICAR[i:i + 45]) for i in range(0, len(EICAR), 45))
    block = b"begin 644 eicar.com\n" + uu + b"`\nend\n"
    raw = (b"From: a@x\nContent-Type: multipart/mixed; boundary=B\n\n"
           b"--B\nContent-Type: text/plain\n\nSee below.\n\n" + block + b"\nbye\n"
           b"--B\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: x-uuencode\n\n"
           + block + b"--B--\n")
    x, parts = run(raw)
    assert eicar_paths(parts) == ["1/eicar.com", "2"]
    assert x.problems == []


def test_malformed_mime_is_scanned_as_far_as_reachable():
    raw = (b"From: a@x\nContent-Type: multipart/mixed; boundary=B\n\n"
           b"--B\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
           b"SGVsbG8g!!d29ybGQ=x\n"
           b"--B\nContent-Type: application/octet-stream; name=e.com\n\n" + EICAR + b"\n")
    x, parts = run(raw)
    assert parts["1"].data == b"Hello world"
    assert EICAR in parts["2/e.com"].data
    details = [p.detail for p in x.problems if p.code == "malformed"]
    assert any("CloseBoundaryNotFound" in d for d in details)
    assert any("Base64" in d for d in details)


def test_header_only_message_and_garbage():
    x, parts = run(b"Subject: only headers")
    assert "headers" in parts and x.subject == "only headers"
    x, parts = run(b"\x00\xff\xfe garbage \x80" * 10)
    assert "headers" in parts


def _cpython_email_samples() -> list[Path]:
    import test.test_email

    data = Path(test.test_email.__file__).parent / "data"
    return sorted(data.glob("msg_*.txt"))


def test_cpython_email_corpus_never_raises():
    samples = _cpython_email_samples()
    assert len(samples) > 40
    for sample in samples:
        x = extract(sample.read_bytes(), Limits())
        parts = list(x)
        assert parts and parts[0].path == "headers", sample.name


# --- containers, by content -------------------------------------------------------------------


CONTAINERS = {
    "zip": (lambda: zip_of({"dir/eicar.com": EICAR}), "dir/eicar.com"),
    "zip-stored": (lambda: zip_of({"eicar.com": EICAR}, 0), "eicar.com"),
    "zip-bzip2": (lambda: zip_of({"eicar.com": EICAR}, 12), "eicar.com"),
    "zip-lzma": (lambda: zip_of({"eicar.com": EICAR}, 14), "eicar.com"),
    "tar": (lambda: tar_of({"eicar.com": EICAR}), "eicar.com"),
    "tar.gz": (lambda: tar_of({"eicar.com": EICAR}, "w:gz"), "data/eicar.com"),
    "tar.bz2": (lambda: tar_of({"eicar.com": EICAR}, "w:bz2"), "data/eicar.com"),
    "tar.xz": (lambda: tar_of({"eicar.com": EICAR}, "w:xz"), "data/eicar.com"),
    "gz": (lambda: gzip_of(EICAR, "eicar.com"), "eicar.com"),
    "bz2": (lambda: bz2_of(EICAR), "data"),
    "xz": (lambda: xz_of(EICAR), "data"),
    "7z": (lambda: sevenzip_of({"eicar.com": EICAR}), "eicar.com"),
    "tnef": (lambda: tnef_of("eicar.com", EICAR), "eicar.com"),
    "msg": (lambda: outlook_msg([("eicar.com", EICAR)]), "eicar.com"),
    "eml": (lambda: message("x", (EICAR, "application/octet-stream", "eicar.com")),
            "2/eicar.com"),
    "mbox": (lambda: b"From a@x Thu Jan  1 00:00:00 2024\n" + message(
        "x", (EICAR, "application/octet-stream", "eicar.com")), "message-1.eml/2/eicar.com"),
}


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_eicar_found_inside_each_container_attached_under_a_neutral_name(kind):
    build, member = CONTAINERS[kind]
    raw = message("see attachment", (build(), "application/octet-stream", "attachment.bin"))
    x, parts = run(raw)
    assert eicar_paths(parts) == [f"2/attachment.bin/{member}"]
    assert "2/attachment.bin" in parts  # the container itself is a part too
    assert x.problems == []


def test_compressed_tar_layers_keep_names_when_known():
    raw = message("x", (tar_of({"e.com": EICAR}, "w:gz"), "application/gzip", "pack.tgz"))
    _, parts = run(raw)
    assert eicar_paths(parts) == ["2/pack.tgz/pack.tar/e.com"]
    assert parts["2/pack.tgz/pack.tar"].content_type == "application/x-tar"


def test_zip_attached_as_jpeg_is_opened_and_member_type_is_detected():
    raw = message("x", (zip_of({"e.com": EICAR, "p.exe": b"MZ\x90\x00"}), "image/jpeg",
                        "photo.jpg"))
    _, parts = run(raw)
    assert parts["2/photo.jpg"].content_type == "image/jpeg"
    assert eicar_paths(parts) == ["2/photo.jpg/e.com"]
    assert parts["2/photo.jpg/p.exe"].content_type == "application/vnd.microsoft.portable-executable"


def test_eicar_at_depth_three_zip_in_zip_in_forwarded_message():
    inner = zip_of({"x.exe": EICAR})
    outer = zip_of({"evil.zip": inner})
    fwd = message("fwd", (outer, "application/zip", "outer.zip"))
    raw = message("see", (b"%PDF-1", "application/pdf", "a.pdf"), (fwd, "message/rfc822", "fwd.eml"))
    _, parts = run(raw)
    assert eicar_paths(parts) == ["3/fwd.eml/2/outer.zip/evil.zip/x.exe"]
    assert parts["3/fwd.eml"].content_type == "message/rfc822"
    assert "3/fwd.eml/headers" in parts


def test_nested_message_without_filename_is_message_eml():
    inner = message("inner", (EICAR, "application/octet-stream", "e.com"))
    raw = (b"From: a@x\nContent-Type: multipart/mixed; boundary=B\n\n--B\n"
           b"Content-Type: message/rfc822\n\n" + inner + b"\n--B--\n")
    _, parts = run(raw)
    assert eicar_paths(parts) == ["1/message.eml/2/e.com"]


def test_member_names_are_only_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = zip_of({"../../etc/passwd": EICAR, "/abs/x": b"y"})
    tarball = tar_of({"../../tmp/owned": EICAR})
    raw = message("x", (evil, "application/zip", "a.zip"), (tarball, "application/x-tar", "b.tar"))
    _, parts = run(raw)
    assert eicar_paths(parts) == ["2/a.zip/../../etc/passwd", "3/b.tar/../../tmp/owned"]
    assert list(tmp_path.iterdir()) == []


def test_outlook_msg_embedded_object_is_unsupported():
    raw = message("x", (outlook_msg([("e.com", EICAR), ("inner", None)]),
                        "application/octet-stream", "m.msg"))
    x, parts = run(raw)
    assert eicar_paths(parts) == ["2/m.msg/e.com"]
    assert [(p.code, p.part) for p in x.problems] == [("unsupported", "2/m.msg/inner")]


def test_rar_is_reported_unsupported():
    x, _ = run(message("x", (b"Rar!\x1a\x07\x01\x00" + bytes(40), "application/zip", "r.zip")))
    assert [(p.code, p.detail, p.part) for p in x.problems] == [
        ("unsupported", "rar: no free extractor", "2/r.zip")]


def test_deflate64_member_is_unsupported():
    raw_entry = ("e.com", 0, 9, b"\x00" * 20, 0, 68)
    x, _ = run(message("x", (raw_zip([raw_entry]), "application/zip", "d.zip")))
    assert [(p.code, p.part) for p in x.problems] == [("unsupported", "2/d.zip/e.com")]


def test_corrupt_archive_is_malformed_but_message_continues():
    bad = zip_of({"e.com": EICAR})[:40]
    raw = message("x", (bad, "application/zip", "bad.zip"), (EICAR, "application/x-msdownload", "e.com"))
    x, parts = run(raw)
    assert eicar_paths(parts) == ["3/e.com"]
    assert [(p.code, p.part) for p in x.problems] == [("malformed", "2/bad.zip")]


# --- passwords ----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda pw: aes_zip_of({"e.com": EICAR}, pw.encode()),
    lambda pw: zipcrypto_zip("e.com", EICAR, pw.encode()),
    lambda pw: sevenzip_of({"e.com": EICAR}, password=pw),
], ids=["zip-aes", "zip-zipcrypto", "7z"])
def test_encrypted_archives(build):
    blob = build("s3cret-42")
    plain = message("Here you go.", (blob, "application/octet-stream", "f.bin"))
    x, parts = run(plain)
    assert eicar_paths(parts) == []
    assert [p.code for p in x.problems] == ["encrypted"]
    assert x.problems[0].part.startswith("2/f.bin")
    assert "s3cret" not in repr(x.problems)

    x, parts = run(plain, passwords=("infected", "s3cret-42"))
    assert eicar_paths(parts) == ["2/f.bin/e.com"] and x.problems == []

    for body in ("The password is s3cret-42.", "Passwort: s3cret-42", "pw = \"s3cret-42\""):
        x, parts = run(message(body, (blob, "application/octet-stream", "f.bin")))
        assert eicar_paths(parts) == ["2/f.bin/e.com"], body
        assert x.problems == []


# --- limits and bombs -------------------------------------------------------------------------


def test_zip_bomb_stops_at_filesize_limit():
    bomb = zip_bomb(2048)  # 2 GiB of zeros in about 2 MB
    assert len(bomb) < 4 * 1024 * 1024
    raw = message("x", (bomb, "application/zip", "bomb.zip"), (EICAR, "text/plain", "e.txt"))
    x, parts = run(raw, Limits(max_filesize=8 << 20))
    assert "2/bomb.zip/zeros.bin" not in parts
    assert [(p.code, p.part) for p in x.problems] == [("limit:max-filesize", "2/bomb.zip/zeros.bin")]
    assert eicar_paths(parts) == ["3/e.txt"]  # the rest of the message is still scanned


def test_bomb_of_many_small_bombs_stops_at_the_scan_size_budget():
    leaf = zip_bomb(4)  # 4 MiB of zeros each, cut by the ratio limit
    level = zip_of({f"l0-{i}.zip": leaf for i in range(16)}, zipfile.ZIP_STORED)
    nested = zip_of({f"l1-{i}.zip": level for i in range(16)})  # 256 leaves, 1 GiB expanded
    raw = message("x", (nested, "application/zip", "nested.zip"))
    x, parts = run(raw, Limits(max_ratio=2, max_scansize=4 << 20))
    codes = [p.code for p in x.problems]
    assert codes[-1] == "limit:max-scansize"
    # each leaf is cut at 1 MiB (the ratio floor); the work stopped once 4 MiB had been
    # decompressed and thrown away: a handful of leaves, not 256
    assert codes.count("limit:max-ratio") <= 4
    assert len(parts) < 40


def test_member_declaring_too_much_is_not_read_and_a_lying_one_is_not_clean():
    honest = raw_zip([("big.bin", 0, 8, zeros_deflate(64), 0, 64 << 20)])
    x, parts = run(message("x", (honest, "application/zip", "a.zip")), Limits(max_filesize=8 << 20))
    assert [(p.code, "declares" in p.detail) for p in x.problems] == [("limit:max-filesize", True)]
    liar = raw_zip([("small.bin", 0, 8, zeros_deflate(64), 0, 10)])  # declares 10 bytes
    x, parts = run(message("x", (liar, "application/zip", "a.zip")), Limits(max_filesize=8 << 20))
    assert x.problems and not [p for p in parts if p.endswith(".bin") and parts[p].size > 10]


def test_ratio_limit():
    blob = raw_zip([("z.bin", 0, 8, zeros_deflate(4), 0, 4 << 20)])
    x, parts = run(message("x", (blob, "application/zip", "z.zip")), Limits(max_ratio=10))
    assert [(p.code, p.part) for p in x.problems] == [("limit:max-ratio", "2/z.zip/z.bin")]
    assert "2/z.zip/z.bin" not in parts


def test_gzip_bomb_stops_at_scansize_limit():
    raw = message("x", (gzip_bomb(1024), "application/octet-stream", "g.gz"))
    x, parts = run(raw, Limits(max_scansize=16 << 20))
    assert [(p.code, p.part) for p in x.problems] == [("limit:max-scansize", "2/g.gz/g")]
    assert "2/g.gz" in parts and "2/g.gz/g" not in parts


def test_bomb_memory_stays_bounded():
    code = textwrap.dedent("""
        import resource
        from rescan.extract import extract
        from rescan.models import Limits
        from tests.extract_fixtures import message, zip_bomb
        raw = message("x", (zip_bomb(3072), "application/zip", "bomb.zip"))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x = extract(raw, Limits())
        n = sum(1 for _ in x)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(n, [p.code for p in x.problems], (peak - base) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=1)
    parts, rest = out[0], out[1]
    codes_text, growth_mib = rest.rsplit(maxsplit=1)
    assert int(parts) == 3  # headers, body, the zip; not the 3 GiB member
    assert "limit:max-filesize" in codes_text
    # Default max_filesize is 100 MiB: the stopped member never grew much beyond it.
    assert int(growth_mib) < 300


def test_overlapping_zip_entries_are_detected():
    entry = ("zeros.bin", 0, 8, zeros_deflate(64), 0, 64 << 20)
    bomb = raw_zip([entry], centrals=200)  # 200 entries share one compressed blob
    x, parts = run(message("x", (bomb, "application/zip", "o.zip")))
    assert [p.code for p in x.problems] == ["malformed"]
    assert "overlapping" in x.problems[0].detail and x.problems[0].part == "2/o.zip"
    assert not any(path.startswith("2/o.zip/") for path in parts)


def test_max_files_limit():
    blob = zip_of({f"f{i}.txt": b"x%d" % i for i in range(50)})
    x, parts = run(message("x", (blob, "application/zip", "many.zip")), Limits(max_files=10))
    assert len(parts) == 10
    assert [p.code for p in x.problems] == ["limit:max-files"]


def test_max_recursion_limit():
    blob = EICAR
    for i in range(5):
        blob = zip_of({f"level{i}.zip" if i else "e.com": blob})
    raw = message("x", (blob, "application/zip", "deep.zip"))
    x, parts = run(raw, Limits(max_recursion=3))
    assert eicar_paths(parts) == []
    assert [(p.code, p.part) for p in x.problems] == [
        ("limit:max-recursion", "2/deep.zip/level4.zip/level3.zip/level2.zip")]
    x, parts = run(raw, Limits(max_recursion=5))
    assert eicar_paths(parts) and x.problems == []


def test_filesize_limit_on_mime_leaf():
    x, parts = run(message("x", (bytes(5000), "application/octet-stream", "big.bin")),
                   Limits(max_filesize=4096))
    assert "2/big.bin" not in parts and "1" in parts
    assert [(p.code, p.part) for p in x.problems] == [("limit:max-filesize", "2/big.bin")]


def test_iterating_twice_starts_over():
    x = extract(message("x", (bytes(5000), "application/octet-stream", "b")),
                Limits(max_filesize=4096))
    first, second = [p.path for p in x], [p.path for p in x]
    assert first == second and len(x.problems) == 1


def test_extraction_is_lazy():
    raw = message("x", (zip_of({"a": b"1", "b": b"2"}), "application/zip", "z.zip"))
    it = iter(extract(raw, Limits()))
    assert next(it).path == "headers"
    it.close()


def test_7z_writes_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = message("x", (sevenzip_of({"a/b.txt": EICAR}), "application/octet-stream", "s.7z"))
    _, parts = run(raw)
    assert eicar_paths(parts) == ["2/s.7z/a/b.txt"]
    assert list(tmp_path.iterdir()) == []


def test_zip_member_with_bad_crc_is_malformed_and_others_still_scanned():
    good = ("e.com", 0, 0, EICAR, zlib.crc32(EICAR), len(EICAR))
    bad = ("bad.bin", 0, 0, b"payload", 1234, 7)
    x, parts = run(message("x", (raw_zip([bad, good]), "application/zip", "c.zip")))
    assert eicar_paths(parts) == ["2/c.zip/e.com"]
    assert [(p.code, p.part) for p in x.problems] == [("malformed", "2/c.zip/bad.bin")]
