#!/usr/bin/env python3
"""test_mma_layout: the register layout of attn_decode_tc (kernels/cuda/engine_ops.cu),
checked on the CPU by simulating its warp lane by lane.

The tensor-core decode attention permutes the head_dim axis so that every key and value
load is a 16-byte one covering whole sectors. Its GPU test (tests/gpu/test_cuda_engine_ops,
test_attention_decode_tc) checks the results against the CPU; this test checks the index
algebra where no GPU is: each lane's registers are filled as the kernel's loads fill them
(the formulas below are the kernel's), and mma.sync m16n8k16 is applied with the fragment
layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"),
written out here from the manual, not from the kernel:

  A (16 x 16, row):  a0,a1: (g, 2t..2t+1)  a2,a3: (g+8, 2t..)  a4,a5: (g, 2t+8..)
                     a6,a7: (g+8, 2t+8..)   registers {a0,a1} {a2,a3} {a4,a5} {a6,a7}
  B (16 x 8, col):   b0,b1: (k 2t..2t+1, n g)  b2,b3: (k 2t+8..2t+9, n g)
  C (16 x 8):        c0,c1: (g, 2t..2t+1)  c2,c3: (g+8, 2t..2t+1)
  with g = lane / 4, t = lane % 4.

and movmatrix.m8n8.trans.b16 ("movmatrix"): the lane holding row r, columns 2c and 2c + 1
of an 8 x 8 matrix gets row r, columns 2c and 2c + 1 of its transpose.

Small integers keep every product and sum exact, so S = Q K^T and O = P V of the simulated
warp must equal the plain products exactly, for head_dim 64 and 128 and groups of up to 8
and 16 q heads: the form with q heads as the mma rows (groups of 9 to 16) and the
transposed one (S^T = K Q^T, O^T = V^T P^T, groups of up to 8).
Run: python3 tests/unit/test_mma_layout.py
"""
import random
import sys

WARP = 32


def mma(a_regs, b_regs, c_regs):
    """D = A B + C over one warp: a_regs[lane] = 4 pairs, b_regs[lane] = 2 pairs,
    c_regs[lane] = 4 floats, laid out as the PTX ISA says (see the docstring)."""
    A = [[None] * 16 for _ in range(16)]
    B = [[None] * 8 for _ in range(16)]
    for lane in range(WARP):
        g, t = lane // 4, lane % 4
        a = a_regs[lane]
        for j in range(2):
            A[g][2 * t + j] = a[0][j]
            A[g + 8][2 * t + j] = a[1][j]
            A[g][2 * t + 8 + j] = a[2][j]
            A[g + 8][2 * t + 8 + j] = a[3][j]
        b = b_regs[lane]
        for j in range(2):
            B[2 * t + j][g] = b[0][j]
            B[2 * t + 8 + j][g] = b[1][j]
    out = []
    for lane in range(WARP):
        g, t = lane // 4, lane % 4
        d = list(c_regs[lane])
        for e in range(4):
            row = g + (8 if e >= 2 else 0)
            col = 2 * t + (e & 1)
            d[e] += sum(A[row][kk] * B[kk][col] for kk in range(16))
        out.append(d)
    return out


def movmatrix(regs):
    """movmatrix.m8n8.trans.b16 over one warp: regs[lane] = the pair (row lane / 4,
    columns 2 (lane % 4), + 1); returns the same layout of the transpose."""
    M = [[None] * 8 for _ in range(8)]
    for lane in range(WARP):
        r, c = lane // 4, lane % 4
        M[r][2 * c], M[r][2 * c + 1] = regs[lane]
    return [(M[2 * (lane % 4)][lane // 4], M[2 * (lane % 4) + 1][lane // 4])
            for lane in range(WARP)]


def key_run(key, first_chunk, stride, n):
    """load_key_run<STRIDE>: n 16-byte chunks (8 elements) of a key, every STRIDE-th from
    chunk first_chunk on, as one flat run of 8 n elements."""
    run = []
    for u in range(n):
        c = first_chunk + u * stride
        run += key[8 * c:8 * c + 8]
    return run


def hd_of(pos):
    """The epilogue: accumulator position nt * 8 + n is hd 8 (8 (nt / 8) + n) + nt % 8."""
    return 8 * (8 * (pos // 8 // 8) + pos % 8) + pos // 8 % 8


def check_transposed(hd, grp, rnd):
    """The form of groups of up to 8 q heads: S^T = K Q^T with the keys as the mma rows,
    P^T through movmatrix, O^T = V^T P^T, accumulators to the positions the kernel writes."""
    ksteps, kq, vq = hd // 16, hd // 4, hd // 8
    q = [[rnd.randint(-3, 3) if h < grp else 0 for _ in range(hd)] for h in range(8)]
    keys = [[rnd.randint(-3, 3) for _ in range(hd)] for _ in range(16)]
    vals = [[rnd.randint(-3, 3) for _ in range(hd)] for _ in range(16)]
    acc = [[0] * 4 for _ in range(WARP)]
    for kk in range(ksteps):
        a_regs, b_regs = [], []
        for lane in range(WARP):
            g, t = lane // 4, lane % 4
            k0 = key_run(keys[g], t, 4, kq // 8)  # kr[0]: key gq; kr[1]: key gq + 8
            k8 = key_run(keys[g + 8], t, 4, kq // 8)
            w = 4 * (kk // 2 * 2 + kk % 2)  # words (kk % 2) * 2, +1 of chunk kk / 2
            a_regs.append([(k0[w], k0[w + 1]), (k8[w], k8[w + 1]), (k0[w + 2], k0[w + 3]),
                           (k8[w + 2], k8[w + 3])])
            e = 8 * (4 * (kk // 2) + t) + 4 * (kk % 2)  # the kernel's q index (qhi[kk][0, 2])
            b_regs.append([(q[g][e], q[g][e + 1]), (q[g][e + 2], q[g][e + 3])])
        acc = mma(a_regs, b_regs, acc)
    for lane in range(WARP):
        g, t = lane // 4, lane % 4
        for e in range(4):
            key, head = g + (8 if e >= 2 else 0), 2 * t + (e & 1)
            want = sum(q[head][d] * keys[key][d] for d in range(hd))
            if acc[lane][e] != want:
                sys.exit(f"transposed hd {hd} grp {grp}: S[{head}][{key}] = {acc[lane][e]}, "
                         f"want {want}")

    # P in S^T's accumulator layout: lane (g, t) holds heads 2t, 2t + 1 of keys g, g + 8
    p = [[rnd.randint(-2, 2) for _ in range(16)] for _ in range(8)]
    x1 = movmatrix([(p[2 * (l % 4)][l // 4], p[2 * (l % 4) + 1][l // 4]) for l in range(WARP)])
    x2 = movmatrix([(p[2 * (l % 4)][l // 4 + 8], p[2 * (l % 4) + 1][l // 4 + 8])
                    for l in range(WARP)])
    o_sim = [[None] * hd for _ in range(8)]
    for mt in range(vq // 2):
        a_regs = []
        for lane in range(WARP):
            g, t = lane // 4, lane % 4
            vr = [key_run(vals[k], g, 8, vq // 8) for k in
                  (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)]
            a_regs.append([(vr[0][2 * mt], vr[1][2 * mt]), (vr[0][2 * mt + 1], vr[1][2 * mt + 1]),
                           (vr[2][2 * mt], vr[3][2 * mt]),
                           (vr[2][2 * mt + 1], vr[3][2 * mt + 1])])
        b_regs = [[x1[lane], x2[lane]] for lane in range(WARP)]
        acc = mma(a_regs, b_regs, [[0] * 4 for _ in range(WARP)])
        for lane in range(WARP):  # sacc[warp][head][16 mt + (8) + gq]
            g, t = lane // 4, lane % 4
            for e in range(4):
                head = 2 * t + (e & 1)
                d = hd_of(16 * mt + (8 if e >= 2 else 0) + g)
                if o_sim[head][d] is not None:
                    sys.exit(f"transposed hd {hd}: output column {d} written twice")
                o_sim[head][d] = acc[lane][e]
    for h in range(8):
        for d in range(hd):
            want = sum(p[h][k] * vals[k][d] for k in range(16))
            if o_sim[h][d] != want:
                sys.exit(f"transposed hd {hd} grp {grp}: O[{h}][{d}] = {o_sim[h][d]}, "
                         f"want {want}")


def check(hd, grp, rnd):
    g16 = grp > 8
    rows = 16  # the mma rows; q heads past the group are zero
    ksteps, kq, vq = hd // 16, hd // 4, hd // 8
    q = [[rnd.randint(-3, 3) if h < grp else 0 for _ in range(hd)] for h in range(rows)]
    keys = [[rnd.randint(-3, 3) for _ in range(hd)] for _ in range(16)]
    vals = [[rnd.randint(-3, 3) for _ in range(hd)] for _ in range(16)]

    # S = Q K^T for the step's two 8-key tiles j (keys 8 j + g of the lane's load)
    s_sim = [[0] * 16 for _ in range(rows)]
    for j in range(2):
        acc = [[0.0] * 4 for _ in range(WARP)]
        for kk in range(ksteps):
            a_regs, b_regs = [], []
            for lane in range(WARP):
                g, t = lane // 4, lane % 4
                e = 8 * (4 * (kk // 2) + t) + 4 * (kk % 2)  # the kernel's q index
                q0 = q[g][e:e + 4]
                q1 = q[g + 8][e:e + 4] if g16 else [0, 0, 0, 0]
                a_regs.append([(q0[0], q0[1]), (q1[0], q1[1]), (q0[2], q0[3]),
                               (q1[2], q1[3])])
                kr = key_run(keys[8 * j + g], t, 4, kq // 8)  # load_key_run<4>, e0 = 8 t
                w = 4 * (kk // 2 * 2 + kk % 2)  # words (kk % 2) * 2, +1 of chunk kk / 2
                b_regs.append([(kr[w], kr[w + 1]), (kr[w + 2], kr[w + 3])])
            acc = mma(a_regs, b_regs, acc)
        for lane in range(WARP):
            g, t = lane // 4, lane % 4
            for e in range(4):
                row = g + (8 if e >= 2 else 0)
                s_sim[row][8 * j + 2 * t + (e & 1)] = acc[lane][e]
    for h in range(rows):
        for key in range(16):
            want = sum(q[h][d] * keys[key][d] for d in range(hd))
            if s_sim[h][key] != want:
                sys.exit(f"hd {hd} grp {grp}: S[{h}][{key}] = {s_sim[h][key]}, want {want}")

    # O = P V with P the score accumulators as the A operand (keys 2t.., 2t+8..)
    p = [[rnd.randint(-2, 2) if h < grp else 0 for _ in range(16)] for h in range(rows)]
    o_sim = [[None] * hd for _ in range(rows)]
    for nt in range(vq):
        a_regs, b_regs = [], []
        for lane in range(WARP):
            g, t = lane // 4, lane % 4
            hi = (lambda k: p[g + 8][k]) if g16 else (lambda k: 0)
            a_regs.append([(p[g][2 * t], p[g][2 * t + 1]), (hi(2 * t), hi(2 * t + 1)),
                           (p[g][2 * t + 8], p[g][2 * t + 9]),
                           (hi(2 * t + 8), hi(2 * t + 9))])
            # values of keys 2t, 2t + 1, 2t + 8, 2t + 9: load_key_run<8>, e0 = 8 g
            vr = [key_run(vals[k], g, 8, vq // 8) for k in
                  (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)]
            b_regs.append([(vr[0][nt], vr[1][nt]), (vr[2][nt], vr[3][nt])])
        acc = mma(a_regs, b_regs, [[0.0] * 4 for _ in range(WARP)])
        # the epilogue: accumulator position nt * 8 + n is hd 8 (8 (nt / 8) + n) + nt % 8
        for lane in range(WARP):
            g, t = lane // 4, lane % 4
            for e in range(4):
                row = g + (8 if e >= 2 else 0)
                d = hd_of(nt * 8 + 2 * t + (e & 1))
                if o_sim[row][d] is not None:
                    sys.exit(f"hd {hd}: output column {d} written twice")
                o_sim[row][d] = acc[lane][e]
    for h in range(rows):
        for d in range(hd):
            want = sum(p[h][k] * vals[k][d] for k in range(16))
            if o_sim[h][d] != want:
                sys.exit(f"hd {hd} grp {grp}: O[{h}][{d}] = {o_sim[h][d]}, want {want}")


def main():
    rnd = random.Random(1234)
    n = 0
    for hd in (64, 128):
        for grp in (1, 4, 8, 12, 16):
            check(hd, grp, rnd)
            n += 1
            if grp <= 8:
                check_transposed(hd, grp, rnd)
                n += 1
    print(f"test_mma_layout: {n} cases: S = Q K^T and O = P V exact through the fragments")


if __name__ == "__main__":
    main()
