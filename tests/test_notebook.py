"""SLM.ipynb executed as a user runs it: nbclient starts the python3 kernel in the repository
folder and runs every cell, which drive the scripts. The one change: after the first cell (the
recipe for this machine: on a CPU, config/tinystories_cpu.py and its 15-minute budget), a cell
appends flags that shrink that recipe line (tests/conftest.py's SHRINK, as in test_configs.py:
sizes, a 1-minute budget or a short --max_iters; sizes only, as conftest.py allows) and sets temp folders
for data and output. So the notebook's own recipe runs, its schedule keys included, and the LR
it logs must end at min_lr. The notebook finds ../shared's stories and tokenizer files itself,
as offline users' notebooks do."""
import re

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import REPO, assert_lr_schedule_ends_at_min_lr, notebook_recipes, shrink_flags

# the budget the CPU recipe gets here: the report card (a full pass over val.bin and ten stories,
# ~25 s whatever the model) is part of it, as in the 15-minute run
NOTEBOOK_BUDGET_MINUTES = 1.0


def shown(nb, snippet):
    """What the one code cell whose source holds snippet showed: its stdout (a `!` line's
    output, stderr included), and its display data by MIME type."""
    [cell] = [c for c in nb.cells if c.cell_type == 'code' and snippet in c.source]
    stream = ''.join(o.text for o in cell.outputs if o.output_type == 'stream' and o.name == 'stdout')
    data = {kind: value for o in cell.outputs for kind, value in o.get('data', {}).items()}
    return stream, data


def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = nbformat.read(REPO / 'SLM.ipynb', as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert all(not c.outputs and c.execution_count is None for c in code), 'commit SLM.ipynb with outputs cleared'
    out = tmp_path / 'out'
    # the recipe line the first cell picked, shrunk (whichever it picked: each line has its flags);
    # the report card stays on: the notebook shows it. A 64-token context, not SHRINK's 16: the
    # transformers cell writes up to block_size tokens, and a story of 12 has too few words
    flags = {recipe: ' '.join(shrink_flags(recipe, budget=NOTEBOOK_BUDGET_MINUTES, shortcuts=()) + ['--block_size=64'])
             for recipe in notebook_recipes()}
    shrink = nbformat.v4.new_code_cell(f"TRAIN += ' ' + {flags!r}[TRAIN]\nDATA_DIR = {str(tmp_path / 'data')!r}\n"
                                       f"OUT_DIR = {str(out)!r}")
    nb.cells.insert(nb.cells.index(code[0]) + 1, shrink)
    monkeypatch.delenv('TIKTOKEN_CACHE_DIR', raising=False)  # the notebook's offline path sets it
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(REPO)}}).execute()

    recipe, _ = shown(nb, "TRAIN = 'config/tinystories_cpu.py'")
    assert ('No GPU: the CPU recipe, 15 minutes' in recipe) == (not torch.cuda.is_available()), recipe
    assert 'data: --train_files=../shared/data/tinystories/train.txt' in shown(nb, 'REPO_URL = ')[0]
    assert '2,800 stories' in shown(nb, '!{sys.executable} prepare.py')[0] and (tmp_path / 'data' / 'meta.json').is_file()
    trained = shown(nb, '!{sys.executable} train.py')[0]
    iters, _ = assert_lr_schedule_ends_at_min_lr(out, trained)
    assert f'done: {iters} iters' in trained and 'report.md' in trained
    if 'No GPU' in recipe:  # the CPU recipe's budget, fitted
        assert f'--max_minutes={NOTEBOOK_BUDGET_MINUTES:g}: max_iters={iters} (' in trained
    assert 'image/png' in shown(nb, "Image(f'{OUT_DIR}/loss_curve.png')")[1]
    report = shown(nb, "open(f'{OUT_DIR}/report.md')")[1]['text/markdown']
    assert report.startswith('# SLM run report') and 'val loss, full pass' in report
    stories = shown(nb, '!{sys.executable} sample.py')[0]
    # two stories, each from the prompt (a story may say it again), each followed by sample.py's separator
    assert stories.startswith('Once upon a time') and stories.count('-' * 15) == 2, stories
    assert len(re.findall(r'-{15}\s*Once upon a time', stories)) == 1, stories
    assert (out / 'slm-hf' / 'model.safetensors').is_file()
    hf_story = shown(nb, 'AutoModelForCausalLM')[0]
    assert hf_story.startswith('Once upon a time') and len(hf_story.split()) > 10, hf_story


def test_outside_a_checkout_the_setup_cell_clones_the_repository(tmp_path):
    """A fresh Colab runtime: the kernel starts in an empty folder. Without REPO_URL the setup
    cell stops with one line; with it (here: this repository's own git folder), it clones the
    repository and continues inside it."""
    nb = nbformat.read(REPO / 'SLM.ipynb', as_version=4)
    recipe, setup = [c for c in nb.cells if c.cell_type == 'code'][:2]
    nb.cells = [recipe, setup, nbformat.v4.new_code_cell("print(os.getcwd(), os.path.exists('model.py'))")]
    client = NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}})
    with client.setup_kernel():
        client.execute_cell(recipe, 0)
        with pytest.raises(CellExecutionError) as stopped:
            client.execute_cell(setup, 1)
        assert 'SystemExit' in str(stopped.value) and ('This notebook runs in the SLM repository: '
                                                       'set REPO_URL above to clone it') in str(stopped.value)
        setup.source = setup.source.replace("REPO_URL = ''", f'REPO_URL = {str(REPO)!r}', 1)
        client.execute_cell(setup, 1)
        client.execute_cell(nb.cells[2], 2)
    assert nb.cells[2].outputs[0].text.strip() == f'{tmp_path / "slm"} True'
