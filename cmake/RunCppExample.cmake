# CTest driver: installs this build of qext, builds examples/cpp against the installed package with
# find_package(Qext), and runs it. Variables: QEXT_BUILD_DIR, QEXT_SOURCE_DIR, TORCH_DIR
# (the folder of TorchConfig.cmake).
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
