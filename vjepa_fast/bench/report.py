"""Where benchmark results go: a JSON file with everything and a markdown table beside it."""
import json
from pathlib import Path


def write_results(out: str | Path, name: str, result: dict, table: str) -> dict[str, Path]:
    """Write <out>/<name>.json and <out>/<name>.md; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["md"].write_text(table)
    return paths
