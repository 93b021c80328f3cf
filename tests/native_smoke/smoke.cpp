// A stand-alone driver of the native CPU library's C ABI, for checking a build for another
// architecture (tests/test_native_cpu_cross.py compiles it with the library sources for
// aarch64 and runs it under qemu-user): 8-bit block-wise AdamW steps on inputs from a file,
// results to a file, which the test compares with the pure-torch reference bit for bit.
//
// Input (little-endian): int64 n, int64 steps, float qmap_signed[256], qmap_unsigned[256],
// thresholds_signed[255], thresholds_unsigned[255], float param[n], float grad[steps][n],
// StepScalars scalars[steps]. Output: float param[n], uint8 state1[n], uint8 state2[n],
// float absmax1[blocks], float absmax2[blocks].
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "pagedopt_cpu.h"

namespace {

template <class T>
bool read_array(FILE* f, std::vector<T>& out, size_t count) {
  out.resize(count);
  return fread(out.data(), sizeof(T), count, f) == count;
}

int fail(const char* what) {
  fprintf(stderr, "smoke: %s (%s)\n", what, po_last_error());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return fail("usage: smoke IN OUT");
  FILE* in = fopen(argv[1], "rb");
  if (!in) return fail("cannot open the input file");
  int64_t header[2];
  if (fread(header, sizeof(int64_t), 2, in) != 2) return fail("short input header");
  const int64_t n = header[0], steps = header[1], blocks = (n + 255) / 256;
  std::vector<float> qs, qu, ts, tu, param, grads;
  std::vector<pagedopt::StepScalars> scalars;
  if (!read_array(in, qs, 256) || !read_array(in, qu, 256) || !read_array(in, ts, 255) || !read_array(in, tu, 255) ||
      !read_array(in, param, n) || !read_array(in, grads, n * steps) || !read_array(in, scalars, steps)) {
    return fail("short input");
  }
  fclose(in);
  if (po_abi_version() != PO_ABI_VERSION) return fail("ABI version mismatch");
  if (po_init(qs.data(), qu.data(), ts.data(), tu.data()) != PO_OK) return fail("po_init failed");
  std::vector<uint8_t> state1(n, 0), state2(n, 0);
  std::vector<float> absmax1(blocks, 0.0f), absmax2(blocks, 0.0f);
  for (int64_t step = 0; step < steps; ++step) {
    po_item item;
    memset(&item, 0, sizeof(item));
    item.param = param.data();
    item.grad = grads.data() + step * n;
    item.state1 = state1.data();
    item.state2 = state2.data();
    item.absmax1 = absmax1.data();
    item.absmax2 = absmax2.data();
    item.numel = n;
    item.param_dtype = pagedopt::ELEM_F32;
    item.grad_dtype = pagedopt::ELEM_F32;
    item.quantized = 1;
    item.block_wise = 1;
    item.scalars = scalars[step];
    if (po_update(pagedopt::ALGO_ADAM, &item, 1, 2, nullptr) != PO_OK) return fail("po_update failed");
  }
  FILE* out = fopen(argv[2], "wb");
  if (!out) return fail("cannot open the output file");
  fwrite(param.data(), sizeof(float), n, out);
  fwrite(state1.data(), 1, n, out);
  fwrite(state2.data(), 1, n, out);
  fwrite(absmax1.data(), sizeof(float), blocks, out);
  fwrite(absmax2.data(), sizeof(float), blocks, out);
  fclose(out);
  printf("isa level %d: %lld elements, %lld steps\n", po_isa(), static_cast<long long>(n), static_cast<long long>(steps));
  return 0;
}
