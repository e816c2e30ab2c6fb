"""Something-Something v2 as published (`data.format: ssv2`): labels.json, train.json and validation.json, and
the videos <id>.webm. A video's class is its `template` without the square brackets; class ids: labels.json's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List

import numpy as np

from x3d_exp.data.datasets.base import (AnnotationNotFound, Layout, PathTable, VideoList, check_class_count,
                                        register_layout, where)
from x3d_exp.errors import DataError

_JSON_SPACE = re.compile(r"\s*")


def _json_items(path: Path):
    """[(line, key, value)] of the members of the top-level JSON object, or (line, None, element) of the array,
    so that a bad entry is named by its line."""
    if not path.is_file():
        raise AnnotationNotFound(path)
    text = path.read_text(encoding="utf-8-sig")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where(path, err.lineno)}: not valid JSON ({err.msg})") from None
    if not isinstance(document, (dict, list)) or not document:
        raise DataError(f"{path}: expected a non-empty JSON object or array")
    # The document parsed, so this walk over its top level cannot fail; it only notes where each item starts.
    decoder, items, line, counted = json.JSONDecoder(), [], 1, 0
    is_object = isinstance(document, dict)
    pos = _JSON_SPACE.match(text, text.index("{" if is_object else "[") + 1).end()
    while text[pos] not in "]}":
        line += text.count("\n", counted, pos)
        counted = pos
        key = None
        if is_object:
            key, pos = decoder.raw_decode(text, pos)
            pos = _JSON_SPACE.match(text, _JSON_SPACE.match(text, pos).end() + 1).end()  # past the colon
        value, pos = decoder.raw_decode(text, pos)
        items.append((line, key, value))
        pos = _JSON_SPACE.match(text, pos).end()
        if text[pos] == ",":
            pos = _JSON_SPACE.match(text, pos + 1).end()
    return items


def _ssv2_classes(path: Path) -> List[str]:
    """labels.json: {"Approaching something with your camera": "0", ...} -> names by id."""
    names = {}
    for line, name, value in _json_items(path):
        if name is None or not str(value).isdigit():
            raise DataError(f"{where(path, line)}: expected `\"<class name>\": \"<id>\"`, got {value!r}")
        if int(value) in names:
            raise DataError(f"{where(path, line)}: class id {value} appears twice")
        names[int(value)] = name
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{path}: class ids must be 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


@register_layout("ssv2")
class SomethingSomethingV2(Layout):
    """labels.json, train.json, validation.json (data.annotation_dir) and <id>.webm videos (data.video_dir)."""

    def read(self, data_cfg, root: Path, split: str) -> VideoList:
        num_classes, annotation_dir, video_dir = data_cfg.num_classes, data_cfg.annotation_dir, data_cfg.video_dir
        folders = [root / annotation_dir, root] if annotation_dir else [root]
        folder = next((f for f in folders if (f / "labels.json").is_file()), folders[0])
        class_file = folder / "labels.json"
        class_names = _ssv2_classes(class_file)
        check_class_count(class_names, num_classes, class_file)
        class_id = {name: i for i, name in enumerate(class_names)}
        # The test list has no labels: val and test both read validation.json.
        list_path = folder / ("train.json" if split == "train" else "validation.json")
        videos = root / video_dir if video_dir else root
        paths, labels = [], []
        for line, _, entry in _json_items(list_path):
            if not isinstance(entry, dict) or not str(entry.get("id", "")).strip() or "template" not in entry:
                raise DataError(f"{where(list_path, line)}: malformed entry: expected an object with \"id\" and "
                                f"\"template\"")
            # The template names the class with its placeholders in brackets: "Putting [something] on [something]".
            name = str(entry["template"]).replace("[", "").replace("]", "")
            if name not in class_id:
                raise DataError(f"{where(list_path, line)}: unknown class {name!r} (template {entry['template']!r} "
                                f"without brackets is not in {class_file.name})")
            paths.append(str(videos / f"{str(entry['id']).strip()}.webm"))
            labels.append(class_id[name])
        return VideoList(PathTable(paths), np.asarray(labels, np.int32), class_names, str(list_path))
