// Run one expert of a turbocompile `--backend aoti` artifact from C++, without Python.
//
//   aoti_loader ARTIFACT/experts/main/aoti.pt2 1,16,5,12,20 1,32,64 [timestep]
//
// Arguments: the package, the latent shape of x (B,C,F,H,W) and the text-context shape (B,L,D) the artifact was
// built for (manifest.json: expert_info.<name>.input_shapes), and an optional timestep on the 0..1000 scale.
// Prints the velocity's shape and statistics. The package runs on the device it was compiled for (its metadata
// says which); inputs are created there.
//
// Packages built with the acceleration passes call the torch.ops.turbocompile custom ops, which are registered from
// Python only: build with `--skip-pass attention_to_sagesla --skip-pass linear_to_w8a8 --skip-pass fuse_norms`
// for a C++-only deployment (see README.md).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <iostream>
#include <sstream>
#include <string>
#include <vector>

static std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> dims;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) dims.push_back(std::stoll(item));
  return dims;
}

static int run(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " PACKAGE.pt2 X_SHAPE CONTEXT_SHAPE [TIMESTEP]\n"
              << "  e.g. " << argv[0] << " experts/main/aoti.pt2 1,16,5,12,20 1,32,64 933\n";
    return 2;
  }
  const std::string package = argv[1];
  const auto x_shape = parse_shape(argv[2]);
  const auto ctx_shape = parse_shape(argv[3]);
  const float timestep = argc > 4 ? std::stof(argv[4]) : 933.0f;

  torch::NoGradGuard no_grad;
  torch::inductor::AOTIModelPackageLoader loader(package);
  const auto metadata = loader.get_metadata();
  const auto dev_it = metadata.find("AOTI_DEVICE_KEY");
  const std::string device_name = dev_it == metadata.end() ? "cpu" : dev_it->second;
  const torch::Device device(device_name);
  // The weights are package constants; float32 for --gpu cpu builds, bfloat16 for GPU builds.
  const auto dtype = device.is_cuda() ? torch::kBFloat16 : torch::kFloat32;

  torch::manual_seed(0);
  auto opts = torch::TensorOptions().device(device);
  std::vector<at::Tensor> inputs = {
      torch::randn(x_shape, opts.dtype(dtype)),
      torch::full({x_shape[0]}, timestep, opts.dtype(torch::kFloat32)),
      torch::randn(ctx_shape, opts.dtype(dtype)),
  };
  std::vector<at::Tensor> outputs = loader.run(inputs);
  const at::Tensor v = outputs.at(0).to(torch::kFloat32).cpu();
  std::cout << "device " << device_name << ", velocity " << v.sizes() << ", mean " << v.mean().item<float>()
            << ", std " << v.std().item<float>() << ", finite " << std::boolalpha
            << v.isfinite().all().item<bool>() << "\n";
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {
    // One line, not a C++ backtrace: the usual cause is a package that needs turbocompile's Python-only custom ops.
    const std::string what = e.what_without_backtrace();
    std::cerr << "error: " << what.substr(0, what.find('.')) << "\n";
    if (what.find("turbocompile::") != std::string::npos)
      std::cerr << "hint: this package calls turbocompile's custom ops, which are registered from Python only; "
                   "rebuild with --skip-pass attention_to_sagesla --skip-pass linear_to_w8a8 --skip-pass fuse_norms\n";
    return 1;
  }
}
