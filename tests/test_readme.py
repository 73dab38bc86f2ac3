"""The ```python examples of README.md run as written: each fenced block is exec'd in a fresh
namespace on the CPU with a fixed torch seed, one test case per block, named file:line.

docs/*.md blocks are collected too when they are complete examples, i.e. start with an
import; the others are signatures or fragments that continue the prose's variables (q,
cache, ...) and are not meant to run alone. A block that needs CUDA (device="cuda" or
.cuda()) is skipped, with the reason, where no GPU is present."""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NEEDS_CUDA = re.compile(r"""device\s*=\s*["']cuda|\.cuda\(""")


def python_blocks(path):
    """(line of the opening fence, code) of every ```python block of a markdown file."""
    blocks, start, lines = [], None, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if start is None and line.strip() == "```python":
            start, lines = number, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines) + "\n"))
            start = None
        elif start is not None:
            lines.append(line)
    assert start is None, f"{path.name}: the ```python block opened at line {start} is never closed"
    return blocks


def collect():
    cases = [(ROOT / "README.md", line, code) for line, code in python_blocks(ROOT / "README.md")]
    for doc in sorted((ROOT / "docs").glob("*.md")):
        cases += [(doc, line, code) for line, code in python_blocks(doc)
                  if re.match(r"\s*(import|from)\s", code)]
    return [pytest.param(path, line, code, id=f"{path.relative_to(ROOT)}:{line}") for path, line, code in cases]


CASES = collect()


def test_readme_has_examples():
    assert any(p.id.startswith("README.md:") for p in CASES), "README.md lost its ```python examples"


@pytest.mark.parametrize("path,line,code", CASES)
def test_snippet_runs(path, line, code):
    if NEEDS_CUDA.search(code) and not torch.cuda.is_available():
        pytest.skip("the example needs a CUDA GPU (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    # Leading newlines make the block's line numbers those of the markdown file in tracebacks.
    exec(compile("\n" * line + code, str(path.relative_to(ROOT)), "exec"), {"__name__": "__readme__"})


def test_readme_states_paged_cache_signature():
    """README documents PagedKVCache's whole constructor, defaults included."""
    import inspect

    import attnkit
    signature = str(inspect.signature(attnkit.PagedKVCache)).replace("'", '"')
    assert f"PagedKVCache{signature}" in (ROOT / "README.md").read_text()


def test_has_cuda_kernel_names():
    """has_cuda_kernel's docstring and the README name every op it knows; others raise."""
    import attnkit
    from attnkit._ops import CUDA_KERNELS
    readme = (ROOT / "README.md").read_text()
    for name in CUDA_KERNELS:
        assert f'"{name}"' in attnkit.has_cuda_kernel.__doc__ and f"`{name}`" in readme, name
    with pytest.raises(ValueError, match="unknown op name"):
        attnkit.has_cuda_kernel("attn")
