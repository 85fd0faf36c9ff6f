// Runs a qwen3c artifact's compiled library without Python, for testing a cross-compiled
// artifact under qemu-user with TVM's runtime for that architecture.
//
//   run_artifact MODEL_SO PARAMS_FILE OUT_FILE DECODE_STEPS TOKEN...
//
// PARAMS_FILE holds the weights in TVM's parameter format, named by their position ("0",
// "1", ...). The prompt is prefilled, then DECODE_STEPS greedy tokens are decoded; the
// logits of the prompt's last position and of every decode step are appended to OUT_FILE as
// float32, and the greedy tokens are printed on one line.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

using tvm::ffi::Any;
using tvm::ffi::Array;
using tvm::ffi::Function;
using tvm::ffi::Map;
using tvm::ffi::Module;
using tvm::ffi::Shape;
using tvm::ffi::String;
using tvm::ffi::Tensor;

namespace {

constexpr DLDevice kCPU{kDLCPU, 0};
constexpr int kPooledAllocator = 2;

Function Global(const char* name) { return Function::GetGlobalRequired(name); }

struct HostAlloc {
  void AllocData(DLTensor* tensor) { tensor->data = std::malloc(tvm::ffi::GetDataSize(*tensor)); }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

Tensor Int32Tensor(const std::vector<int32_t>& values) {
  Tensor t = Tensor::FromNDAlloc(HostAlloc(), Shape({static_cast<int64_t>(values.size())}),
                                 DLDataType{kDLInt, 32, 1}, kCPU);
  std::memcpy(t.data_ptr(), values.data(), values.size() * sizeof(int32_t));
  return t;
}

// Logits [rows, vocab] (float32, on the CPU) -> the last row.
std::vector<float> LastRow(const Tensor& logits) {
  int64_t rows = logits.size(0), vocab = logits.size(-1);
  const float* data = static_cast<const float*>(logits.data_ptr()) + (rows - 1) * vocab;
  return std::vector<float>(data, data + vocab);
}

int32_t Argmax(const std::vector<float>& row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s MODEL_SO PARAMS_FILE OUT_FILE DECODE_STEPS TOKEN...\n",
                 argv[0]);
    return 2;
  }
  std::vector<int32_t> prompt;
  for (int i = 5; i < argc; ++i) prompt.push_back(std::atoi(argv[i]));
  int decode_steps = std::atoi(argv[4]);

  Module library = Module::LoadFromFile(argv[1]);
  Module vm = library->GetFunction("vm_load_executable").value()().cast<Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);

  Map<String, Tensor> named = Global("runtime.LoadParamsFromFile")(String(argv[2]))
                                  .cast<Map<String, Tensor>>();
  Array<Tensor> params;
  for (size_t i = 0; i < named.size(); ++i) params.push_back(named.at(std::to_string(i)));

  const int64_t capacity = 256, chunk = 64, page = 16;
  Any kv = vm->GetFunction("create_paged_kv_cache").value()(
      Shape({1}), Shape({capacity}), Shape({chunk}), Shape({page}), Shape({0}));
  Global("vm.builtin.kv_state_add_sequence")(kv, 0);
  Function begin = Global("vm.builtin.kv_state_begin_forward");
  Function end = Global("vm.builtin.kv_state_end_forward");

  FILE* out = std::fopen(argv[3], "wb");
  if (out == nullptr) {
    std::perror(argv[3]);
    return 1;
  }
  auto emit = [&](const std::vector<float>& row) {
    std::fwrite(row.data(), sizeof(float), row.size(), out);
    int32_t token = Argmax(row);
    std::printf("%d ", token);
    return token;
  };

  begin(kv, Shape({0}), Shape({static_cast<int64_t>(prompt.size())}));
  Tensor logits = vm->GetFunction("prefill").value()(
      Int32Tensor(prompt), Int32Tensor({static_cast<int32_t>(prompt.size()) - 1}), kv, params)
                      .cast<Tensor>();
  end(kv);
  int32_t token = emit(LastRow(logits));
  for (int step = 0; step < decode_steps; ++step) {
    begin(kv, Shape({0}), Shape({1}));
    logits = vm->GetFunction("decode").value()(Int32Tensor({token}), kv, params).cast<Tensor>();
    end(kv);
    token = emit(LastRow(logits));
  }
  std::printf("\n");
  std::fclose(out);
  return 0;
}
