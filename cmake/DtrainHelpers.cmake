# Helpers shared by every folder's CMakeLists.txt.

# Our own code builds warning-free with these.
set(DTRAIN_WARNINGS -Wall -Wextra -Wno-unused-parameter)

# Flags every dtrain target shares. They must be identical for all targets
# that reuse the torch precompiled header (GCC refuses a PCH built with other
# -fpic/-fpie or -pthread settings), so position-independent code is asked for
# here, once, instead of through POSITION_INDEPENDENT_CODE (which gives
# libraries -fPIC but executables -fPIE).
add_library(dtrain_build_flags INTERFACE)
target_compile_options(dtrain_build_flags INTERFACE -fPIC -pthread)
target_link_libraries(dtrain_build_flags INTERFACE Threads::Threads)
# libtorch.so exports its own (older) copy of the std::filesystem functions;
# when it precedes libstdc++ in a binary's DT_NEEDED list the dynamic linker
# binds our std::filesystem calls to it, and remove_all crashes. Naming
# libstdc++ first on the link line (link options come before the objects and
# libraries) makes its definitions win. See docs/dependencies.md.
target_link_options(dtrain_build_flags INTERFACE "LINKER:--push-state,--no-as-needed" "-lstdc++" "LINKER:--pop-state")

# Torch's include directory carries its own google/protobuf and fmt headers,
# which would shadow Debian's (docs/dependencies.md). This directory holds
# links to Debian's and is put on the include path ahead of torch's: a plain
# -I directory is searched before torch's -isystem ones.
set(DTRAIN_SHADOW_INCLUDE ${CMAKE_BINARY_DIR}/debian_include_first)
file(MAKE_DIRECTORY ${DTRAIN_SHADOW_INCLUDE})
foreach(_dir google fmt spdlog)
  if(NOT EXISTS ${DTRAIN_SHADOW_INCLUDE}/${_dir})
    file(CREATE_LINK /usr/include/${_dir} ${DTRAIN_SHADOW_INCLUDE}/${_dir} SYMBOLIC)
  endif()
endforeach()

# dtrain_torch: what a target links to use LibTorch. It brings the shadow
# include directory and the compile definitions the other targets agree on.
add_library(dtrain_torch INTERFACE)
target_include_directories(dtrain_torch BEFORE INTERFACE ${DTRAIN_SHADOW_INCLUDE})
target_link_libraries(dtrain_torch INTERFACE dtrain_build_flags ${TORCH_LIBRARIES})
if(DTRAIN_TORCH_HAS_CUDA)
  target_compile_definitions(dtrain_torch INTERFACE DTRAIN_TORCH_HAS_CUDA=1)
endif()
if(DTRAIN_HAVE_NCCL)
  target_compile_definitions(dtrain_torch INTERFACE DTRAIN_HAVE_NCCL=1)
  target_link_libraries(dtrain_torch INTERFACE dtrain_nccl)
endif()

# One precompiled header for <torch/torch.h>, built once and reused by every
# target that calls dtrain_use_torch(): a torch TU drops from ~15 s to a few.
add_library(dtrain_torch_pch OBJECT ${PROJECT_SOURCE_DIR}/cmake/torch_pch.cc)
target_link_libraries(dtrain_torch_pch PRIVATE dtrain_torch)
target_compile_options(dtrain_torch_pch PRIVATE ${DTRAIN_WARNINGS})
target_precompile_headers(dtrain_torch_pch PRIVATE <torch/torch.h>)

# dtrain_use_torch(target [PUBLIC|PRIVATE]): link LibTorch and reuse the PCH.
function(dtrain_use_torch target)
  set(scope PRIVATE)
  if(ARGC GREATER 1)
    set(scope ${ARGV1})
  endif()
  target_link_libraries(${target} ${scope} dtrain_torch)
  target_precompile_headers(${target} REUSE_FROM dtrain_torch_pch)
endfunction()

# dtrain_add_library(name SOURCES ... [DEPS ...] [PRIVATE_DEPS ...] [TORCH])
# A folder's library: public headers in <folder>/include, warnings on.
function(dtrain_add_library name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include)
  target_compile_options(${name} PRIVATE ${DTRAIN_WARNINGS})
  target_link_libraries(${name} PUBLIC dtrain_build_flags ${ARG_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  if(ARG_TORCH)
    dtrain_use_torch(${name} PUBLIC)
  endif()
endfunction()

# dtrain_add_executable(name SOURCES ... [DEPS ...] [TORCH]): lands in build/bin.
function(dtrain_add_executable name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_compile_options(${name} PRIVATE ${DTRAIN_WARNINGS})
  target_link_libraries(${name} PRIVATE dtrain_build_flags ${ARG_DEPS})
  if(ARG_TORCH)
    dtrain_use_torch(${name})
  endif()
endfunction()

# dtrain_add_test(name SOURCES ... [DEPS ...] [TORCH] [LABELS ...] [MPI_RANKS n...])
# One GoogleTest executable per folder under test; each TEST becomes a ctest
# test (gtest_discover_tests), so `ctest -R Config` works.
# MPI_RANKS: the sources bring their own main() (MPI); the executable runs as
# one ctest test per rank count, under launch/mpirun.sh, named <name>.np<n>.
function(dtrain_add_test name)
  cmake_parse_arguments(ARG "TORCH" "" "SOURCES;DEPS;LABELS;MPI_RANKS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  target_compile_options(${name} PRIVATE ${DTRAIN_WARNINGS})
  if(ARG_MPI_RANKS)
    target_link_libraries(${name} PRIVATE dtrain_build_flags ${ARG_DEPS} GTest::gtest GTest::gmock)
  else()
    target_link_libraries(${name} PRIVATE dtrain_build_flags ${ARG_DEPS} GTest::gtest GTest::gtest_main GTest::gmock)
  endif()
  target_compile_definitions(${name} PRIVATE
    DTRAIN_SOURCE_DIR="${PROJECT_SOURCE_DIR}"
    DTRAIN_BINARY_DIR="${CMAKE_BINARY_DIR}")
  if(ARG_TORCH)
    dtrain_use_torch(${name})
  endif()
  if(ARG_MPI_RANKS)
    foreach(_np ${ARG_MPI_RANKS})
      add_test(NAME ${name}.np${_np}
        COMMAND bash ${PROJECT_SOURCE_DIR}/launch/mpirun.sh -n ${_np} -- $<TARGET_FILE:${name}>
        WORKING_DIRECTORY ${CMAKE_BINARY_DIR})
      # Each rank pins one core at a time (OMP_NUM_THREADS=1); ctest counts them.
      set_tests_properties(${name}.np${_np} PROPERTIES LABELS "${ARG_LABELS};mpi" PROCESSORS ${_np}
        ENVIRONMENT "OMP_NUM_THREADS=1" TIMEOUT 600)
    endforeach()
    return()
  endif()
  include(GoogleTest)
  gtest_discover_tests(${name}
    WORKING_DIRECTORY ${CMAKE_BINARY_DIR}
    DISCOVERY_TIMEOUT 60
    PROPERTIES LABELS "${ARG_LABELS}")
endfunction()
