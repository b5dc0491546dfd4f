"""Markdown table of the second cuDNN kernel run, with the committed table's route (decided on CPU)."""
import sys
from routes import final_routes, load_rows


def cell(r, b):
    t = r["tflops"].get(b)
    return f"{t[0]:.0f} / {t[1]:.0f}" if t else "—"


rows = load_rows(sys.argv[1:])
print("| mask | S | hq:hkv | triton | cudnn | torch_sdpa | cudnn_sdpa | flex | final route | routed | vs flex | vs triton | vs cudnn_sdpa |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
for r, route in zip(rows, final_routes(rows)):
    h = f'{r["hq"]}:{r["hkv"]}'
    got = r["tflops"][route][1]
    ratio = lambda b: f'{got / r["tflops"][b][1]:.2f}x' if b in r["tflops"] else "—"  # noqa: E731
    print(f'| {r["mask"]} | {r["seqlen"] // 1024}k | {h} | {cell(r,"triton")} | {cell(r,"cudnn")} | {cell(r,"torch_sdpa")} | '
          f'{cell(r,"cudnn_sdpa")} | {cell(r,"flex")} | {route} | {got:.0f} | {ratio("flex")} | {ratio("triton")} | {ratio("cudnn_sdpa")} |')
