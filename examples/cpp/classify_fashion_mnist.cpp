// Classifies Fashion-MNIST test images with a qext model converted and saved in Python
// (examples/export_fashion_mnist.py: qext.convert + qext.save_torchscript), loaded here with
// torch::jit::load. Writes one predicted class per line and prints the accuracy and the throughput.
//
//   classify_fashion_mnist <model.pt> <t10k-images-idx3-ubyte.gz> <t10k-labels-idx1-ubyte.gz>
//                          <predictions-out.txt> [--limit N] [--batch B] [--threads T]
//                          [--mean M --std S]
//
// The images are normalised exactly as examples/fashion_mnist_qat.py's to_tensors does: float32 v /
// 255, then (x - mean) / std. mean and std come from --mean / --std or, by default, from the extra
// file "normalization.txt" that the exporter stores in the model archive.
//
// Including qext/qext.h links libqext, whose registrations of the torch.ops.qext operators the
// traced model calls (qext::quantized_conv2d, qext::quantized_linear, ...).
#include <qext/qext.h>
#include <torch/script.h>
#include <torch/torch.h>
#include <zlib.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

[[noreturn]] void fail(const std::string& message) { throw std::runtime_error(message); }

// --------------------------------------------------------------------------------------------------
// IDX files (the MNIST format), gzip-compressed: magic 0x0000 <type> <ndim>, ndim big-endian uint32
// dimensions, then the values. Images: type 0x08 (unsigned byte), 3 dimensions; labels: 0x08, 1.
// --------------------------------------------------------------------------------------------------
struct IdxFile {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};

IdxFile read_idx_gz(const std::string& path, int expected_ndim, const char* what) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) fail(path + ": cannot open (" + std::strerror(errno) + ")");
  struct Closer {
    gzFile f;
    ~Closer() { gzclose(f); }
  } closer{f};
  auto read_exact = [&](void* dst, size_t n, const std::string& part) {
    size_t done = 0;
    auto* out = static_cast<unsigned char*>(dst);
    while (done < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - done, 1u << 30));
      const int got = gzread(f, out + done, chunk);
      if (got < 0) {
        int code = 0;
        fail(path + ": cannot read the " + part + " (" + gzerror(f, &code) + ")");
      }
      if (got == 0) {
        fail(path + ": truncated: the " + part + " needs " + std::to_string(n) +
             " bytes, the file has " + std::to_string(done));
      }
      done += static_cast<size_t>(got);
    }
  };
  unsigned char magic[4];
  read_exact(magic, 4, "magic number");
  const uint32_t expected_magic = 0x0800u | static_cast<uint32_t>(expected_ndim);
  const uint32_t seen = (uint32_t{magic[0]} << 24) | (uint32_t{magic[1]} << 16) |
                        (uint32_t{magic[2]} << 8) | magic[3];
  if (seen != expected_magic) {
    char buf[160];
    std::snprintf(buf, sizeof buf, ": not an IDX %s file (magic number 0x%08X, expected 0x%08X)",
                  what, seen, expected_magic);
    fail(path + buf);
  }
  IdxFile idx;
  size_t count = 1;
  for (int d = 0; d < expected_ndim; ++d) {
    unsigned char b[4];
    read_exact(b, 4, "header");
    const uint32_t n =
        (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | b[3];
    if (n == 0 || n > (1u << 28))
      fail(path + ": implausible dimension " + std::to_string(d) + " = " + std::to_string(n));
    idx.dims.push_back(n);
    count *= n;
    if (count > (size_t{1} << 34)) fail(path + ": header announces more than 16 GiB of data");
  }
  idx.data.resize(count);
  std::ostringstream part;
  part << "data of ";
  for (size_t d = 0; d < idx.dims.size(); ++d) part << (d ? "x" : "") << idx.dims[d];
  part << " values";
  read_exact(idx.data.data(), count, part.str());
  unsigned char extra;
  const int more = gzread(f, &extra, 1);
  if (more < 0) {
    int code = 0;
    fail(path + ": cannot read (" + gzerror(f, &code) + ")");
  }
  if (more > 0) fail(path + ": more data than the header announces (" + part.str() + ")");
  return idx;
}

// --------------------------------------------------------------------------------------------------
// Integrity of the model file. A TorchScript file is a zip archive; PyTorch's reader does not check
// the CRC-32 of its records, so a damaged weight would load silently. This walks the central
// directory (zip64 included) and checks every record's CRC-32 (as qext.load_torchscript does in
// Python).
// --------------------------------------------------------------------------------------------------
uint64_t le(const std::vector<char>& b, size_t pos, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[pos + i]);
  return v;
}

void verify_archive(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path + ": cannot open (" + std::strerror(errno) + ")");
  std::vector<char> b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t size = b.size();
  const std::string truncated =
      path + ": truncated or not a TorchScript file (" + std::to_string(size) + " bytes): ";
  // End of central directory record: signature PK\5\6, at most 64 KiB of comment after it.
  size_t eocd = std::string::npos;
  if (size >= 22) {
    const size_t lowest = size - 22 > 65535 ? size - 22 - 65535 : 0;
    for (size_t i = size - 22 + 1; i-- > lowest;) {
      if (le(b, i, 4) == 0x06054b50u) {
        eocd = i;
        break;
      }
    }
  }
  if (eocd == std::string::npos) fail(truncated + "no zip end-of-central-directory record");
  uint64_t entries = le(b, eocd + 10, 2), cd_offset = le(b, eocd + 16, 4);
  if (entries == 0xFFFF || cd_offset == 0xFFFFFFFFu) {  // zip64: locator right before the record
    if (eocd < 20 || le(b, eocd - 20, 4) != 0x07064b50u) fail(truncated + "zip64 locator missing");
    const uint64_t z64 = le(b, eocd - 20 + 8, 8);
    if (z64 + 56 > size || le(b, z64, 4) != 0x06064b50u)
      fail(truncated + "zip64 end record missing");
    entries = le(b, z64 + 32, 8);
    cd_offset = le(b, z64 + 48, 8);
  }
  size_t p = cd_offset;
  std::vector<unsigned char> inflated;
  for (uint64_t e = 0; e < entries; ++e) {
    if (p + 46 > size || le(b, p, 4) != 0x02014b50u) fail(truncated + "central directory damaged");
    const uint64_t method = le(b, p + 10, 2), crc = le(b, p + 16, 4);
    uint64_t csize = le(b, p + 20, 4), usize = le(b, p + 24, 4), offset = le(b, p + 42, 4);
    const size_t name_len = le(b, p + 28, 2), extra_len = le(b, p + 30, 2),
                 comment_len = le(b, p + 32, 2);
    if (p + 46 + name_len + extra_len + comment_len > size)
      fail(truncated + "central directory damaged");
    const std::string name(b.data() + p + 46, name_len);
    for (size_t x = p + 46 + name_len, end = x + extra_len;
         x + 4 <= end;) {  // zip64 sizes / offset
      const size_t id = le(b, x, 2), field_end = std::min<size_t>(x + 4 + le(b, x + 2, 2), end);
      size_t q = x + 4;
      if (id == 0x0001) {
        if (usize == 0xFFFFFFFFu && q + 8 <= field_end) usize = le(b, q, 8), q += 8;
        if (csize == 0xFFFFFFFFu && q + 8 <= field_end) csize = le(b, q, 8), q += 8;
        if (offset == 0xFFFFFFFFu && q + 8 <= field_end) offset = le(b, q, 8);
      }
      x = field_end;
    }
    p += 46 + name_len + extra_len + comment_len;
    if (offset + 30 > size || le(b, offset, 4) != 0x04034b50u)
      fail(path + ": corrupted: local header of '" + name + "' damaged");
    const uint64_t data = offset + 30 + le(b, offset + 26, 2) + le(b, offset + 28, 2);
    if (data + csize > size)
      fail(truncated + "record '" + name + "' runs past the end of the file");
    const auto* src = reinterpret_cast<const Bytef*>(b.data() + data);
    uLong got = crc32_z(0L, Z_NULL, 0);
    if (method == 0) {
      got = crc32_z(got, src, csize);
    } else if (method == 8) {  // raw deflate (PyTorch compresses the code records)
      if (csize > std::numeric_limits<uInt>::max() || usize >= std::numeric_limits<uInt>::max()) {
        fail(path + ": compressed record '" + name + "' over 4 GiB (not supported)");
      }
      inflated.resize(usize + 1);
      z_stream zs{};
      if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) fail("zlib: inflateInit2 failed");
      zs.next_in = const_cast<Bytef*>(src);
      zs.avail_in = static_cast<uInt>(csize);
      zs.next_out = inflated.data();
      zs.avail_out = static_cast<uInt>(inflated.size());
      const int rc = inflate(&zs, Z_FINISH);
      const uLong out = zs.total_out;
      inflateEnd(&zs);
      if (rc != Z_STREAM_END || out != usize)
        fail(path + ": corrupted: record '" + name + "' cannot be decompressed");
      got = crc32_z(got, inflated.data(), usize);
    } else {
      fail(path + ": record '" + name + "' uses zip compression method " + std::to_string(method) +
           " (not supported)");
    }
    if (got != crc) fail(path + ": corrupted: record '" + name + "' fails its CRC-32 check");
  }
}

// --------------------------------------------------------------------------------------------------
struct Options {
  std::string model, images, labels, output;
  int64_t limit = 0, batch = 256;
  int threads = 0;
  std::optional<double> mean, std;
};

void usage(const char* argv0) {
  std::cerr << "usage: " << argv0
            << " <model.pt> <t10k-images-idx3-ubyte.gz> <t10k-labels-idx1-ubyte.gz> "
               "<predictions-out.txt>\n"
               "       [--limit N] [--batch B] [--threads T] [--mean M --std S]\n";
}

double parse_number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno == ERANGE)
    fail(flag + " expects a number, got '" + text + "'");
  return v;
}

int64_t parse_count(const std::string& flag, const std::string& text, int64_t min_value) {
  const double v = parse_number(flag, text);
  if (v != static_cast<double>(static_cast<int64_t>(v)) || v < static_cast<double>(min_value) ||
      v > 1e12) {
    fail(flag + " expects an integer >= " + std::to_string(min_value) + ", got '" + text + "'");
  }
  return static_cast<int64_t>(v);
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(a + " needs a value");
      return argv[++i];
    };
    if (a == "--limit")
      o.limit = parse_count(a, value(), 0);
    else if (a == "--batch")
      o.batch = parse_count(a, value(), 1);
    else if (a == "--threads")
      o.threads = static_cast<int>(parse_count(a, value(), 1));
    else if (a == "--mean")
      o.mean = parse_number(a, value());
    else if (a == "--std")
      o.std = parse_number(a, value());
    else if (a.rfind("--", 0) == 0)
      fail("unknown option " + a);
    else
      positional.push_back(a);
  }
  if (positional.size() != 4)
    fail("expected 4 file arguments, got " + std::to_string(positional.size()));
  if (o.mean.has_value() != o.std.has_value()) fail("--mean and --std go together");
  if (o.std && !(*o.std > 0.0)) fail("--std must be positive");
  o.model = positional[0], o.images = positional[1], o.labels = positional[2],
  o.output = positional[3];
  return o;
}

// "mean <number>\nstd <number>\n", as written by examples/export_fashion_mnist.py.
void parse_normalization(const std::string& text, double& mean, double& std_dev) {
  std::istringstream in(text);
  std::string key, value;
  bool have_mean = false, have_std = false;
  while (in >> key >> value) {
    if (key == "mean")
      mean = parse_number("normalization.txt mean", value), have_mean = true;
    else if (key == "std")
      std_dev = parse_number("normalization.txt std", value), have_std = true;
  }
  if (!have_mean || !have_std || !(std_dev > 0.0))
    fail("normalization.txt in the model is malformed: '" + text + "'");
}

int run(const Options& o) {
  if (o.threads > 0) at::set_num_threads(o.threads);

  // Data.
  const IdxFile images = read_idx_gz(o.images, 3, "image");
  const IdxFile labels = read_idx_gz(o.labels, 1, "label");
  if (images.dims[0] != labels.dims[0]) {
    fail(o.images + " has " + std::to_string(images.dims[0]) + " images but " + o.labels + " has " +
         std::to_string(labels.dims[0]) + " labels");
  }
  for (size_t i = 0; i < labels.data.size(); ++i) {
    if (labels.data[i] > 9)
      fail(o.labels + ": label " + std::to_string(i) + " is " + std::to_string(labels.data[i]) +
           ", not 0..9");
  }
  const int64_t n = o.limit > 0 ? std::min<int64_t>(o.limit, images.dims[0]) : images.dims[0];
  const int64_t rows = images.dims[1], cols = images.dims[2];

  // Model.
  verify_archive(o.model);
  torch::jit::ExtraFilesMap extra{{"normalization.txt", ""}};
  torch::jit::Module module;
  try {
    module = torch::jit::load(o.model, torch::kCPU, extra);
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    fail(o.model + ": torch::jit::load failed: " + what.substr(0, what.find('\n')));
  }
  module.eval();
  double mean = 0.0, std_dev = 1.0;
  if (o.mean) {
    mean = *o.mean, std_dev = *o.std;
  } else if (!extra["normalization.txt"].empty()) {
    parse_normalization(extra["normalization.txt"], mean, std_dev);
  } else {
    fail(o.model + " has no normalization.txt; pass --mean and --std");
  }

  // float32 v / 255 element by element (numpy's float32 division in to_tensors), then the same
  // torch ops as (x - mean) / std in Python, so the inputs are bit-identical to Python's.
  torch::Tensor x = torch::empty({n, 1, rows, cols}, torch::kFloat32);
  float* px = x.data_ptr<float>();
  for (int64_t i = 0; i < n * rows * cols; ++i) px[i] = static_cast<float>(images.data[i]) / 255.0f;
  x = x.sub(mean).div(std_dev);

  std::ofstream out(o.output);
  if (!out) fail(o.output + ": cannot open for writing (" + std::strerror(errno) + ")");
  std::vector<int64_t> predictions;
  predictions.reserve(n);
  double seconds = 0.0;
  {
    c10::InferenceMode guard;
    auto predict = [&](const torch::Tensor& batch) {
      const c10::IValue out = module.forward({batch});
      if (!out.isTensor())
        fail(o.model + ": the model returns " + out.tagKind() +
             ", expected a tensor of class scores");
      torch::Tensor scores = out.toTensor();
      if (scores.is_quantized()) scores = scores.dequantize();
      if (scores.dim() != 2 || scores.size(0) != batch.size(0)) {
        fail(o.model + ": expected scores of shape [batch, classes], got " +
             c10::str(scores.sizes()));
      }
      return scores.argmax(1);
    };
    // Warm-up, not timed: TorchScript's profiling executor profiles and optimises over the first
    // calls.
    for (int i = 0; i < 3 && n > 0; ++i) predict(x.slice(0, 0, std::min<int64_t>(o.batch, n)));
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t start = 0; start < n; start += o.batch) {
      const torch::Tensor pred =
          predict(x.slice(0, start, std::min<int64_t>(start + o.batch, n))).contiguous();
      const int64_t* pp = pred.data_ptr<int64_t>();
      predictions.insert(predictions.end(), pp, pp + pred.numel());
    }
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  int64_t correct = 0;
  for (int64_t i = 0; i < n; ++i) {
    out << predictions[i] << '\n';
    correct += predictions[i] == labels.data[i];
  }
  out.close();
  if (!out) fail(o.output + ": write failed");

  std::printf("qext %s, model %s (mean %.9g, std %.9g)\n", qext::version().c_str(), o.model.c_str(),
              mean, std_dev);
  std::printf("accuracy %.2f%% (%lld of %lld test images)\n", n ? 100.0 * correct / n : 0.0,
              static_cast<long long>(correct), static_cast<long long>(n));
  std::printf("%.0f images/s (%lld images in %.3f s, batch %lld, %d threads)\n",
              seconds > 0 ? n / seconds : 0.0, static_cast<long long>(n), seconds,
              static_cast<long long>(o.batch), at::get_num_threads());
  std::printf("predictions written to %s\n", o.output.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const std::exception& e) {
    std::cerr << "classify_fashion_mnist: error: " << e.what() << "\n";
    if (argc < 5) usage(argv[0]);
    return 1;
  }
}
