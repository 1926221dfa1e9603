from specserve.gateway.main import main

main()
