"""Markdown table of the second cuDNN kernel run, with the committed table's route (decided on CPU)."""
import json, subprocess, sys, os
rows = []
for f in sys.argv[1:]:
    rows += json.load(open(f))["rows"]
routes = {}
out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "routes.py"), *sys.argv[1:]], capture_output=True, text=True,
                     env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout
for line in out.splitlines():
    if "route=" in line:
        p = line.split()
        routes[(p[0], int(p[1]), p[2])] = p[3].split("=")[1]
def cell(r, b):
    t = r["tflops"].get(b)
    return f"{t[0]:.0f} / {t[1]:.0f}" if t else "—"
def short(S): return f"{S // 1024}k"
print("| mask | S | hq:hkv | triton | cudnn | torch_sdpa | cudnn_sdpa | flex | final route | routed | vs flex | vs triton | vs cudnn_sdpa |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
for r in rows:
    h = f'{r["hq"]}:{r["hkv"]}'
    route = routes[(r["mask"], r["seqlen"], h)]
    got = r["tflops"][route][1]
    ratio = lambda b: f'{got / r["tflops"][b][1]:.2f}x' if b in r["tflops"] else "—"
    print(f'| {r["mask"]} | {short(r["seqlen"])} | {h} | {cell(r,"triton")} | {cell(r,"cudnn")} | {cell(r,"torch_sdpa")} | '
          f'{cell(r,"cudnn_sdpa")} | {cell(r,"flex")} | {route} | {got:.0f} | {ratio("flex")} | {ratio("triton")} | {ratio("cudnn_sdpa")} |')
