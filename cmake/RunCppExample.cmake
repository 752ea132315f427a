# CTest driver: installs this build of qext, builds examples/cpp against the installed package with
# find_package(Qext), and runs it. Then deployment end to end: examples/export_fashion_mnist.py trains,
# converts and saves a model (TorchScript) and writes the eager Python model's predictions for the first
# 2000 Fashion-MNIST test images; examples/cpp/classify_fashion_mnist loads that model with
# torch::jit::load and classifies the same images; the two prediction files must be identical.
# Variables: QEXT_BUILD_DIR, QEXT_SOURCE_DIR, TORCH_DIR (the folder of TorchConfig.cmake),
# PYTHON_EXECUTABLE (the Python with qext installed; empty when qext was built without Python: the
# deployment part is then skipped), QEXT_FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist).
set(prefix ${QEXT_BUILD_DIR}/example-install)
set(example_build ${QEXT_BUILD_DIR}/example-build)
execute_process(COMMAND ${CMAKE_COMMAND} --install ${QEXT_BUILD_DIR} --prefix ${prefix}
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "installing qext into ${prefix} failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${QEXT_SOURCE_DIR}/examples/cpp -B ${example_build}
                        -G Ninja -DCMAKE_PREFIX_PATH=${prefix} -DTorch_DIR=${TORCH_DIR}
                        -DCMAKE_MAKE_PROGRAM=${CMAKE_MAKE_PROGRAM}
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring examples/cpp against the installed qext failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${example_build} RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building examples/cpp failed")
endif()
execute_process(COMMAND ${example_build}/fake_quantize_demo RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "examples/cpp/fake_quantize_demo failed (exit ${rc})")
endif()

# --- deployment: a model converted and saved in Python, run from C++ --------------------------------
if(NOT PYTHON_EXECUTABLE)
  message(STATUS "no PYTHON_EXECUTABLE (qext built without its Python module): deployment check skipped")
  return()
endif()
if(NOT QEXT_FASHION_MNIST_DIR)
  set(QEXT_FASHION_MNIST_DIR /usr/share/datasets/fashion-mnist)
endif()
set(images ${QEXT_FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz)
set(labels ${QEXT_FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz)
if(NOT EXISTS ${images} OR NOT EXISTS ${labels})
  message(FATAL_ERROR "Fashion-MNIST test files not found in ${QEXT_FASHION_MNIST_DIR} "
                      "(Debian package dataset-fashion-mnist; scripts/setup_env.sh installs it)")
endif()
set(export_dir ${QEXT_BUILD_DIR}/example-export)
set(limit 2000)
file(REMOVE ${export_dir}/model.pt ${export_dir}/predictions_python.txt ${export_dir}/predictions_cpp.txt)
execute_process(COMMAND ${PYTHON_EXECUTABLE} ${QEXT_SOURCE_DIR}/examples/export_fashion_mnist.py
                        --out ${export_dir} --limit ${limit} --data-dir ${QEXT_FASHION_MNIST_DIR}
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "examples/export_fashion_mnist.py failed (exit ${rc})")
endif()
execute_process(COMMAND ${example_build}/classify_fashion_mnist ${export_dir}/model.pt ${images} ${labels}
                        ${export_dir}/predictions_cpp.txt --limit ${limit}
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "examples/cpp/classify_fashion_mnist failed (exit ${rc})")
endif()

file(READ ${export_dir}/predictions_python.txt python_predictions)
file(READ ${export_dir}/predictions_cpp.txt cpp_predictions)
if(NOT python_predictions STREQUAL cpp_predictions)
  string(REGEX REPLACE "\n$" "" python_predictions "${python_predictions}")
  string(REGEX REPLACE "\n$" "" cpp_predictions "${cpp_predictions}")
  string(REPLACE "\n" ";" py "${python_predictions}")
  string(REPLACE "\n" ";" cpp "${cpp_predictions}")
  list(LENGTH py n_py)
  list(LENGTH cpp n_cpp)
  set(n_diff 0)
  set(examples "")
  set(n ${n_py})
  if(n_cpp LESS n)
    set(n ${n_cpp})
  endif()
  if(n GREATER 0)
    math(EXPR last "${n} - 1")
    foreach(i RANGE ${last})
      list(GET py ${i} a)
      list(GET cpp ${i} b)
      if(NOT a STREQUAL b)
        math(EXPR n_diff "${n_diff} + 1")
        if(n_diff LESS_EQUAL 5)
          string(APPEND examples " image ${i}: Python ${a}, C++ ${b};")
        endif()
      endif()
    endforeach()
  endif()
  message(FATAL_ERROR "C++ and Python predictions differ: ${n_diff} of the first ${n} lines differ "
                      "(Python ${n_py} lines, C++ ${n_cpp} lines);${examples} files in ${export_dir}")
endif()
string(REGEX MATCHALL "\n" newlines "${cpp_predictions}")
list(LENGTH newlines n_lines)
if(NOT n_lines EQUAL limit)
  message(FATAL_ERROR "expected ${limit} predictions, got ${n_lines}")
endif()
message(STATUS "C++ (torch::jit::load) and Python (eager converted model) predictions agree on all ${n_lines} "
               "test images")
