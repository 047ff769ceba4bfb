from hpo.cli import main

if __name__ == "__main__":  # python -m hpo
    main()
