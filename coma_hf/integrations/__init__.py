"""coma_hf where embedding users already work; each module needs its own extra and is imported on its own:

- `coma_hf.integrations.mteb`: a CoMa checkpoint as an MTEB / MIEB model (`load`), extra `[mteb]`;
- `coma_hf.integrations.mteb_tasks`: MMEB-format folders (the mini-MMEB, a local copy of MMEB) as mteb tasks.

The LanceDB store is a search backend of `coma_hf.inference`; the vLLM client helpers are in `coma_hf.serving`.
"""
