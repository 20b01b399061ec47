"""Rewrite one CUDA source (csrc/backend/cuda/*.cu) into C++ for the CPU emulator (README.md).

    python rewrite_cu.py SRC.cu OUT.cpp

Two rewrites, nothing else (a `#line` keeps the compiler's messages on the original file and lines):
- each launch `kernel<<<grid, block[, shmem[, stream]]>>>(args);` becomes
  `fm_cuda_emu::launch(dim3(grid), dim3(block), shmem, stream, "kernel", [=] { kernel(args); });`
  (the kernel name may be a template-id with commas and `>`, the arguments may span lines); so does each
  `fmc_launch(kernel, grid, block, shmem, stream, args...)` (the backend's launch with programmatic dependent
  launch, csrc/backend/cuda/launch.cuh: a plain launch here), first written as `kernel<<<...>>>(args)`;
- each `__shared__` declaration becomes references into the block's shared memory, one allocation per
  declaration per block (fm_cuda_emu::shared, keyed by a static of the declaration: a __device__ function's
  array is the same one at each call, as in CUDA), filled with NaN first; `extern __shared__ T name[];` (the
  launch's dynamic shared memory) becomes a pointer to it.
Anything it cannot parse is an error, never a silent pass-through.
"""
import re
import sys


def fail(msg):
    sys.exit(f"rewrite_cu.py: {msg}")


def match_close(s, i, open_ch, close_ch):
    """index just past the bracket closing s[i] (== open_ch), skipping nested ones"""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == open_ch:
            depth += 1
        elif s[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j + 1
    fail(f"unbalanced {open_ch} at offset {i}")


def split_top(t):
    """split at commas outside (), [] and {}"""
    parts, depth, cur = [], 0, ""
    for ch in t:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def kernel_start(s, i):
    """start of the kernel name (an identifier, maybe qualified, maybe a template-id) ending before s[i]"""
    j = i
    while True:
        while j > 0 and s[j - 1].isspace():
            j -= 1
        if s[j - 1] == ">":  # template arguments: back to the matching <
            depth = 0
            while True:
                j -= 1
                if j < 0:
                    fail("unbalanced template arguments before <<<")
                if s[j] == ">":
                    depth += 1
                elif s[j] == "<":
                    depth -= 1
                    if depth == 0:
                        break
        k = j
        while k > 0 and (s[k - 1].isalnum() or s[k - 1] in "_:"):
            k -= 1
        if k == j:
            fail(f"no kernel name before <<< at offset {i}")
        return k


FMC_LAUNCH = re.compile(r"\bfmc_launch\s*\(")


def template_end(s, j):
    """index past the template arguments starting at s[j] == '<' (a template-id's: no comparisons inside)"""
    depth = 0
    for k in range(j, len(s)):
        if s[k] == "<":
            depth += 1
        elif s[k] == ">":
            depth -= 1
            if depth == 0:
                return k + 1
    fail(f"unbalanced template arguments at offset {j}")


def rewrite_fmc_launches(s):
    """fmc_launch(kernel, grid, block, shmem, stream, args...) -> kernel<<<grid, block, shmem, stream>>>(args...)"""
    out, pos, n = [], 0, 0
    while True:
        m = FMC_LAUNCH.search(s, pos)
        if not m:
            break
        a, a1 = m.end() - 1, match_close(s, m.end() - 1, "(", ")")
        k = re.match(r"\s*[A-Za-z_][\w:]*\s*", s[a + 1:a1])
        if not k:
            fail(f"no kernel name in fmc_launch at offset {a}")
        k1 = a + 1 + k.end()
        if s[k1] == "<":
            k1 = template_end(s, k1)
        kernel = s[a + 1:k1].strip()
        rest = split_top(s[k1:a1 - 1])
        if rest[0] != "" or len(rest) < 5:
            fail(f"fmc_launch of {kernel}: expected the kernel, grid, block, shmem, stream and the arguments")
        nl = s[m.start():a1].count("\n")
        out.append(s[pos:m.start()])
        out.append(f"{kernel}<<<{', '.join(rest[1:5])}>>>({', '.join(rest[5:])})" + "\n" * nl)
        pos = a1
        n += 1
    out.append(s[pos:])
    return "".join(out), n


def rewrite_launches(s):
    out, pos, n = [], 0, 0
    while True:
        i = s.find("<<<", pos)
        if i < 0:
            break
        k0 = kernel_start(s, i)
        kernel = s[k0:i].strip()
        e = s.find(">>>", i)
        cfg = split_top(s[i + 3:e])
        if not 2 <= len(cfg) <= 4:
            fail(f"launch of {kernel}: {len(cfg)} configuration arguments")
        cfg += ["0", "nullptr"][len(cfg) - 2:]
        a = e + 3
        while s[a].isspace():
            a += 1
        if s[a] != "(":
            fail(f"launch of {kernel}: no argument list")
        a1 = match_close(s, a, "(", ")")
        args = s[a + 1:a1 - 1]
        nl = s[k0:a1].count("\n")  # keep the line count: the #line numbers stay right
        out.append(s[pos:k0])
        out.append(f'fm_cuda_emu::launch(dim3({cfg[0]}), dim3({cfg[1]}), (size_t)({cfg[2]}), {cfg[3]}, '
                   f'"{kernel}", [=]() {{ {kernel}({args}); }})' + "\n" * nl)
        pos = a1
        n += 1
    out.append(s[pos:])
    return "".join(out), n


SHARED = re.compile(r"(extern\s+)?__shared__\s+(__align__\s*\(\s*(\d+)\s*\)\s+)?([^;]*?);")
DECL = re.compile(r"^(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(\[[^\]]*\])*)$")


def rewrite_shared(s):
    n = 0

    def rep(m):
        nonlocal n
        n += 1
        ext, align, body = m.group(1), m.group(3), m.group(4)
        # split the type from the declarators: the type is the words before the first declarator
        t = re.match(r"^((?:const\s+|unsigned\s+|signed\s+|long\s+)*[A-Za-z_][\w:]*)\s+(.*)$", body, re.S)
        if not t:
            fail(f"cannot parse the __shared__ declaration: {m.group(0)!r}")
        ty, decls = t.group(1), split_top(t.group(2))
        res = []
        for d in decls:
            dm = DECL.match(d)
            if not dm:
                fail(f"cannot parse the __shared__ declarator {d!r} in {m.group(0)!r}")
            name, dims = dm.group("name"), dm.group("dims")
            if ext:
                if dims != "[]":
                    fail(f"extern __shared__ {name} is not an unsized array")
                res.append(f"{ty} *const {name} = ({ty} *)fm_cuda_emu::dynamic_shared();")
            else:
                if not dims or "[]" in dims:
                    fail(f"__shared__ {name}: only arrays of known size are modelled")
                al = align or f"alignof({ty})"
                res.append(f"static char fm_key_{name}; {ty}(&{name}){dims} = "
                           f"fm_cuda_emu::shared<{ty}{dims}, {al}>(&fm_key_{name});")
        return " ".join(res) + "\n" * m.group(0).count("\n")

    s, _ = SHARED.subn(rep, s)
    return s, n


def main():
    src, dst = sys.argv[1], sys.argv[2]
    s = open(src).read()
    s, _ = rewrite_fmc_launches(s)
    s, nl = rewrite_launches(s)
    s, ns = rewrite_shared(s)
    if "<<<" in s or "__shared__" in re.sub(r"/\*.*?\*/|//[^\n]*", "", s, flags=re.S):
        fail(f"{src}: a launch or __shared__ left unrewritten")
    with open(dst, "w") as f:
        f.write(f'#line 1 "{src}"\n' + s)


if __name__ == "__main__":
    main()
