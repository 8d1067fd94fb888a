from slime_xvocab.inspect_alignment import cli_main


def test_align_command_shows_chunks(capsys):
    assert cli_main(["--student", "qwen3", "--teacher", "llama3_1", "--text", "347 + 85 🤖"]) == 0
    out = capsys.readouterr().out
    assert "3:1" in out and "2:1" in out  # Qwen3 digits against Llama-3 digit groups
    assert "covered 100.0%" in out


def test_align_command_reports_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "x.txt"
    bad.write_bytes(b"\xff\xfe bad")
    assert cli_main(["--text-file", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_align_command_rejects_unknown_tokenizer(capsys):
    assert cli_main(["--student", "no-such-family", "--teacher", "qwen3"]) == 2
    assert "neither a directory nor a known tokenizer family" in capsys.readouterr().err
