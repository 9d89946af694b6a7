"""The Dockerfile, read: its final stage's instructions, ENV and USER, so that tests follow the file."""

from __future__ import annotations

import json
from dataclasses import dataclass

from dockerfile_parse import DockerfileParser

from support.processes import ROOT

DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    stage: int
    name: str
    value: str


def instructions() -> list[Instruction]:
    parser = DockerfileParser(path=str(DOCKERFILE))
    out: list[Instruction] = []
    stage = -1
    for item in parser.structure:
        name = item["instruction"]
        if name == "FROM":
            stage += 1
        if name != "COMMENT":
            out.append(Instruction(stage, name, item["value"]))
    return out


def final(name: str) -> list[str]:
    items = instructions()
    last = max(i.stage for i in items)
    return [i.value for i in items if i.stage == last and i.name == name]


def exec_form(value: str) -> list[str]:
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), f"not exec form: {value}"
    return argv


def image_env() -> dict[str, str]:
    return dict(DockerfileParser(path=str(DOCKERFILE)).envs)


def image_user() -> tuple[int, int]:
    (user,) = final("USER")
    uid, gid = user.split(":")
    return int(uid), int(gid)
