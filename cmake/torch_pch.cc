// Compiled once to produce the <torch/torch.h> precompiled header (cmake/DtrainHelpers.cmake).
