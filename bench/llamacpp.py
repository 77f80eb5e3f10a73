"""Shared helper for the bench scripts: get llama.cpp and build one of its tools, cached.

llama.cpp comes from the llama-cpp-python source package on PyPI (its vendored copy), downloaded
and extracted once under $EDGELM_HOME/llama.cpp/src. Each tool set gets its own build directory so
the builds do not disturb each other: `build` (llama-bench, used by bench/compare) and
`build-server` (llama-server, used by bench/serve).
"""
import glob, os, shutil, subprocess, sys, tarfile

LLAMA_CPP_PYTHON = "0.3.36"

# Options shared by every build: Release, native SIMD, static, no tests, no libcurl (we pass
# local files), and no prebuilt web UI download.
COMMON_CMAKE = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_USE_PREBUILT_UI=OFF",
                "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF"]


def home():
    return os.environ.get("EDGELM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "edgelm")


def base_dir():
    return os.path.join(home(), "llama.cpp")


def run(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def source_tree():
    """Path of the vendored llama.cpp tree, downloading and extracting the sdist if needed."""
    src = os.path.join(base_dir(), "src")
    trees = glob.glob(os.path.join(src, "llama_cpp_python-*", "vendor", "llama.cpp"))
    if trees:
        return trees[0]
    os.makedirs(src, exist_ok=True)
    if not glob.glob(os.path.join(src, "llama_cpp_python-*.tar.gz")):
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", src])
    sdist = glob.glob(os.path.join(src, "llama_cpp_python-*.tar.gz"))[0]
    with tarfile.open(sdist) as t:
        t.extractall(src, filter="data")
    return glob.glob(os.path.join(src, "llama_cpp_python-*", "vendor", "llama.cpp"))[0]


def cmake_exe():
    cmake = shutil.which("cmake")
    if cmake is not None:
        return cmake
    venv = os.path.join(base_dir(), "venv")
    cmake = os.path.join(venv, "bin", "cmake")
    if not os.path.exists(cmake):
        run([sys.executable, "-m", "venv", venv])
        run([os.path.join(venv, "bin", "pip"), "install", "-q", "cmake"])
    return cmake


def build_tool(build_name, target, extra_cmake):
    """Build llama.cpp `target` in $EDGELM_HOME/llama.cpp/<build_name> once; return the binary.

    The cmake options are recorded next to the build; a build made with other options is redone
    (a build without the record is taken as it is)."""
    build = os.path.join(base_dir(), build_name)
    exe = os.path.join(build, "bin", target)
    args = COMMON_CMAKE + list(extra_cmake)
    stamp = os.path.join(build, "edgelm-cmake-args")
    if os.path.exists(exe):
        if not os.path.exists(stamp) or open(stamp).read() == "\n".join(args):
            return exe
        os.unlink(exe)
    tree = source_tree()
    cmake = cmake_exe()
    run([cmake, "-S", tree, "-B", build] + args)
    run([cmake, "--build", build, "--target", target, "-j", str(os.cpu_count() or 2)])
    with open(stamp, "w") as f:
        f.write("\n".join(args))
    return exe


def cpu_has_amx():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


# ggml's AMX path (used with GGML_NATIVE=ON on CPUs with AMX-INT8) crashes in llama.cpp of this
# version: SIGSEGV at `ldtilecfg` in ggml_backend_amx_mul_mat during the warm-up decode (tile
# config on the stack, tile permission requested on one thread only; see ggml-org/llama.cpp PR
# #26954). On such CPUs the build keeps -march=native but turns AMX off; GCC lets explicit
# -mno-* flags win over a later -march=native. edgelm does not use AMX either.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def no_amx_cmake():
    return [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"] if cpu_has_amx() else []


# llama-server: LLAMA_BUILD_UI=OFF (no npm build of the web UI) plus LLAMA_USE_PREBUILT_UI=OFF (no
# download of it) leaves the embedded UI empty, which is all a benchmark needs; LLAMA_OPENSSL=OFF
# because we only talk plain HTTP on 127.0.0.1.
SERVER_CMAKE = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_UI=OFF",
                "-DLLAMA_OPENSSL=OFF"]


def llama_server():
    return build_tool("build-server", "llama-server", SERVER_CMAKE + no_amx_cmake())


# llama-bench from the same build (same options, so one configure serves both tools).
def llama_bench():
    return build_tool("build-server", "llama-bench", SERVER_CMAKE + no_amx_cmake())


# llama-perplexity from the same build: perplexity and KL divergence beside edgelm's.
def llama_perplexity():
    return build_tool("build-server", "llama-perplexity", SERVER_CMAKE + no_amx_cmake())


# llama-quantize and llama-imatrix from the same build: edgelm's quantizer beside them, and each
# reading the other's files.
def llama_quantize():
    return build_tool("build-server", "llama-quantize", SERVER_CMAKE + no_amx_cmake())


def llama_imatrix():
    return build_tool("build-server", "llama-imatrix", SERVER_CMAKE + no_amx_cmake())


# llama-simple: load a model, decode a prompt and sample — load to first token beside edgelm's.
def llama_simple():
    return build_tool("build-server", "llama-simple", SERVER_CMAKE + no_amx_cmake())


TOOLS = {"llama-server": llama_server, "llama-bench": llama_bench, "llama-simple": llama_simple,
         "llama-perplexity": llama_perplexity, "llama-quantize": llama_quantize,
         "llama-imatrix": llama_imatrix}

if __name__ == "__main__":
    # `python3 bench/llamacpp.py TOOL...`: build what is missing, print each binary's path.
    for name in sys.argv[1:]:
        if name not in TOOLS:
            sys.exit(f"unknown tool {name!r}; known: {', '.join(TOOLS)}")
        print(TOOLS[name]())
