import sys

from x3d_exp.bench.speed.driver import main

sys.exit(main())
