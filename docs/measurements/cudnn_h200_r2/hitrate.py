"""CPU: graph-cache hit rate and padded rows of the cuDNN plan over 200 corpus packs (LRU 256, fwd + bwd keys)."""
from collections import OrderedDict
import numpy as np
from flexcp.bench.docdist import sample_pack
from flexcp.kernels.cudnn.plan import launch_bucket, plan_launches, to_entries
from flexcp.mask import varlen

for S, frac in ((32768, 0.5), (65536, 0.5), (32768, 1.0)):
    lru, hits, misses, pad, real, nl = OrderedDict(), 0, 0, [], [], []
    for step in range(200):
        spec = varlen(sample_pack(S, rng=1000 + step, max_doc_frac=frac).tolist())
        las = plan_launches(to_entries(spec.table), S)
        nl.append(len(las))
        pad.append(sum(launch_bucket(la)[0] * launch_bucket(la)[1] for la in las))
        real.append(S)
        for la in las:
            for bwd in (False, True):
                key = (bwd, la.sig, launch_bucket(la))
                if key in lru:
                    hits += 1; lru.move_to_end(key)
                else:
                    misses += 1; lru[key] = 1
                    if len(lru) > 256: lru.popitem(last=False)
    print(f"S={S} max_doc_frac={frac}: hit rate {hits/(hits+misses):.3f} ({misses} builds), launches/pack {np.mean(nl):.1f}, "
          f"padded rows / tokens: mean {np.mean(np.array(pad)/np.array(real)):.2f} max {np.max(np.array(pad)/np.array(real)):.2f}")
