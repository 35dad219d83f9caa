from hpc_compute.cli import main

main()
