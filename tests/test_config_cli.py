"""Config merging (YAML + command line), --help, and one-line errors for bad configs."""

import pytest

from align.cli import main
from align.config import AlignError, SFTConfig, field_help, load_config


def test_yaml_then_cli_override(tmp_path):
    cfg_file = tmp_path / "r.yaml"
    cfg_file.write_text("learning_rate: 0.001\nmax_steps: 7\nuse_lora: true\nlora_target_modules: [q_proj, v_proj]\n")
    cfg = load_config(SFTConfig, ["--config", str(cfg_file), "--max_steps", "9", "--packing", "false"], "align sft")
    assert cfg.learning_rate == 0.001  # from YAML
    assert cfg.max_steps == 9  # command line wins over YAML
    assert cfg.packing is False and cfg.use_lora is True
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    cfg = load_config(SFTConfig, ["--lora_target_modules", "q_proj,k_proj"], "align sft")
    assert cfg.lora_target_modules == ["q_proj", "k_proj"]


def test_unknown_yaml_field_names_file_and_field(tmp_path):
    cfg_file = tmp_path / "r.yaml"
    cfg_file.write_text("learning_rat: 0.1\n")
    with pytest.raises(AlignError) as e:
        load_config(SFTConfig, ["--config", str(cfg_file)], "align sft")
    assert str(cfg_file) in str(e.value) and "learning_rat" in str(e.value)


def test_bad_type_and_choice():
    with pytest.raises(AlignError, match="max_steps"):
        load_config(SFTConfig, ["--max_steps", "ten"], "align sft")
    with pytest.raises(AlignError, match="lr_scheduler_type"):
        load_config(SFTConfig, ["--lr_scheduler_type", "exp"], "align sft")


def test_help_lists_every_field_with_doc(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, _, _, doc in field_help(SFTConfig):
        assert f"--{name}" in out
        assert doc.split()[0] in out


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["nonsense"]) == 2
    assert main(["sft", "--output_dir", str(tmp_path / "o"), "--model", str(tmp_path), "--train_data", "x.jsonl",
                 "--bogus", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--bogus" in err[-1]
