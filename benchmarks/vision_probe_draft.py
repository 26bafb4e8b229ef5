"""Can the tiny Qwen2.5-VL vision tower learn shapes and digits? A probe: vision tower + mean-pool + linear head."""
import random, time, torch
from coma_hf.tiny import tiny_backbone_config, build_tiny_backbone
from coma_hf.processing_coma import CoMaProcessor
from coma_hf.data.synthetic import generate_split, render_scene, SHAPES

torch.manual_seed(0)
import sys
config = tiny_backbone_config(hidden_size=192, num_layers=1, vision_width=64, vision_depth=2, initializer_range=float(sys.argv[1]))
backbone, parts = build_tiny_backbone(config=config)
proc = CoMaProcessor(parts.image_processor, parts.tokenizer, num_compression_tokens=0, min_image_tokens=64, max_image_tokens=64)
visual = backbone.model.visual
def data(split, n):
    rows = generate_split(split, n)
    xs, ys, ds = [], [], []
    for scene, rec in rows:
        shapes = scene.shapes
        largest = max(shapes, key=lambda o: (o.box[2]-o.box[0])*(o.box[3]-o.box[1]))
        feats = proc.image_processor(images=[render_scene(scene)], return_tensors="pt")
        xs.append((feats["pixel_values"], feats["image_grid_thw"]))
        ys.append(SHAPES.index(largest.shape)); ds.append(int(scene.digit.text) if scene.digit else 10)
    return xs, torch.tensor(ys), torch.tensor(ds)
train, ytr, dtr = data("train", 2000)
dev, ydev, ddev = data("dev", 200)
head = torch.nn.Linear(192, 4 + 11)
opt = torch.optim.AdamW(list(visual.parameters()) + list(head.parameters()), lr=1e-3)
def embed(batch):
    pv = torch.cat([x[0] for x in batch]); grid = torch.cat([x[1] for x in batch])
    out = visual(pv, grid_thw=grid)
    out = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack([c.mean(0) for c in torch.split(out, (grid.prod(-1) // 4).tolist())])
start = time.time()
for step in range(int(sys.argv[2])):
    idx = random.Random(step).sample(range(len(train)), 32)
    logits = head(embed([train[i] for i in idx]))
    loss = torch.nn.functional.cross_entropy(logits[:, :4], ytr[idx]) + torch.nn.functional.cross_entropy(logits[:, 4:], dtr[idx])
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 50 == 49:
        with torch.no_grad():
            logits = torch.cat([head(embed(dev[i:i+50])) for i in range(0, 200, 50)])
        print(step + 1, f"loss {loss.item():.3f}", "shape acc", (logits[:, :4].argmax(1) == ydev).float().mean().item(),
              "digit acc", (logits[:, 4:].argmax(1) == ddev).float().mean().item(), f"{time.time()-start:.0f}s", flush=True)
