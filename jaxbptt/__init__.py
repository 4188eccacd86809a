"""jaxbptt: backpropagation through time for RNN, LSTM and GRU, derived by hand."""

from jaxbptt import _driver
from jaxbptt import interop as interop  # torch and flax are imported lazily
from jaxbptt import ng as ng  # the course's functions and layout
from jaxbptt import slots as slots
from jaxbptt.gru import GRUParams as GRUParams
from jaxbptt.gru import gru as gru
from jaxbptt.gru import init_gru as init_gru
from jaxbptt.lstm import LSTMParams as LSTMParams
from jaxbptt.lstm import LSTMState as LSTMState
from jaxbptt.lstm import init_lstm as init_lstm
from jaxbptt.lstm import lstm as lstm
from jaxbptt.memory import residual_plan as residual_plan
from jaxbptt.output import OutputParams as OutputParams
from jaxbptt.output import cross_entropy as cross_entropy
from jaxbptt.output import init_output as init_output
from jaxbptt.output import predict as predict
from jaxbptt.rnn import RNNParams as RNNParams
from jaxbptt.rnn import init_rnn as init_rnn
from jaxbptt.rnn import rnn as rnn
from jaxbptt.stack import Bidirectional as Bidirectional
from jaxbptt.stack import detach as detach
from jaxbptt.stack import split_stream as split_stream
from jaxbptt.stack import stack as stack

RESIDUAL_POLICIES = _driver.POLICIES  # the named policies `residuals=` accepts

__version__ = "0.1.0"
